"""Training kernels: global-batch BatchNorm, data-parallel SGD steps, magnitude pruning,
the paper's sparse-training protocol (Sec. III B, Fig. 2) and checkpoints.
"""
