"""CIFAR-100 (python-pickle layout) loading, a synthetic stand-in, and rank-invariant batches."""
