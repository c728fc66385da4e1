"""Choosing the reduction backend, and the host path on one process."""
from __future__ import annotations

import pytest
import torch

from hpcqml.errors import UserError
from hpcqml.hessian.reduce import Reducer, choose_backend, cuda_aware_mpi


@pytest.mark.parametrize(("device", "size", "nccl", "aware", "want"), [
    ("cpu", 1, False, False, "none"),
    ("cuda", 1, True, True, "none"),
    ("cpu", 2, True, True, "host"),          # CPU tensors never go to NCCL or device MPI
    ("cuda", 2, False, False, "host"),
    ("cuda", 3, False, True, "cuda-aware-mpi"),
    ("cuda", 2, True, True, "nccl"),         # NCCL first when both are there
    ("cuda", 2, True, False, "nccl"),
])
def test_auto_choice(device, size, nccl, aware, want):
    assert choose_backend(device, size, nccl=nccl, cuda_aware=aware) == want


def test_requested_backend_must_be_usable():
    assert choose_backend("cuda", 2, nccl=False, cuda_aware=True, requested="cuda-aware-mpi") == "cuda-aware-mpi"
    assert choose_backend("cuda", 2, nccl=True, cuda_aware=True, requested="host") == "host"
    with pytest.raises(UserError, match="not usable"):
        choose_backend("cpu", 2, nccl=True, cuda_aware=True, requested="nccl")
    with pytest.raises(UserError, match="not usable"):
        choose_backend("cuda", 2, nccl=False, cuda_aware=False, requested="cuda-aware-mpi")
    with pytest.raises(UserError, match="not one of"):
        choose_backend("cpu", 2, nccl=False, cuda_aware=False, requested="gloo")


def test_environment_overrides_detection(monkeypatch):
    monkeypatch.setenv("HPCQML_CUDA_AWARE_MPI", "1")
    assert cuda_aware_mpi() is True
    monkeypatch.setenv("HPCQML_CUDA_AWARE_MPI", "0")
    assert cuda_aware_mpi() is False


def test_one_process_leaves_the_tensor():
    t = torch.arange(6, dtype=torch.float64)
    r = Reducer(None, "cpu")
    assert r.backend == "none" and r.allreduce_(t) is t
    assert torch.equal(t, torch.arange(6, dtype=torch.float64))
