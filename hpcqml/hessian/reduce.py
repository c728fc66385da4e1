"""Sums over the ranks of a communicator for tensors on any device, without host copies where
the machine allows.

The operator products are sums over data shards, ``H v = sum_r H_r v`` (one partial product
per rank, the chunk decomposition of the loss in :mod:`hpcqml.hessian.hvp`); the partial
products are added by an allreduce.  :class:`Reducer` does that one job behind one method,
``allreduce_(tensor)``, and picks how from what the machine offers (:func:`choose_backend`):

* ``none``: one rank, nothing to add;
* ``nccl``: a CUDA tensor, and ``torch.distributed`` is initialised with the NCCL backend
  over the same ranks: ``torch.distributed.all_reduce`` on the device buffer;
* ``cuda-aware-mpi``: a CUDA tensor, and the MPI library reports CUDA support
  (:func:`cuda_aware_mpi`): mpi4py's ``Allreduce`` on the device buffer (mpi4py reads
  ``__cuda_array_interface__``), after the current stream has finished writing it;
* ``host``: anything else: a CPU tensor in place through a numpy view, a CUDA tensor
  through one host copy each way (:func:`hpcqml.parallel.allreduce_sum`).

Every backend adds the same numbers; the order of the additions is the library's, so two
backends agree to the rounding of a sum of ``size`` terms.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from hpcqml.errors import UserError
from hpcqml.parallel import allreduce_sum

BACKENDS = ("auto", "host", "cuda-aware-mpi", "nccl")
CUDA_AWARE_ENV = "HPCQML_CUDA_AWARE_MPI"
"""Environment variable that overrides the detection of CUDA-aware MPI (``0`` or ``1``)."""


def cuda_aware_mpi() -> bool:
    """Whether the MPI library in this process accepts CUDA device buffers.

    ``HPCQML_CUDA_AWARE_MPI=0/1`` decides when set.  Otherwise Open MPI's extension
    ``MPIX_Query_cuda_support()`` is asked (it returns 1 when the library was built with
    CUDA and the runtime supports CUDA buffers); a library without it counts as not
    CUDA-aware.

    Returns:
        True when device buffers may be handed to MPI.
    """
    forced = os.environ.get(CUDA_AWARE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        from mpi4py import MPI  # noqa: F401  (loads libmpi into the process)

        query = getattr(ctypes.CDLL(None), "MPIX_Query_cuda_support", None)
    except (ImportError, OSError):
        return False
    if query is None:
        return False
    query.restype = ctypes.c_int
    return bool(query() == 1)


def nccl_ready(size: int) -> bool:
    """Whether ``torch.distributed`` is initialised with NCCL over ``size`` ranks."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
                and dist.get_world_size() == size)


def choose_backend(device_type: str, size: int, *, nccl: bool, cuda_aware: bool,
                   requested: str = "auto") -> str:
    """The reduction backend for tensors on ``device_type`` over ``size`` ranks.

    Args:
        device_type: ``cpu``, ``cuda``, ...
        size: ranks in the communicator.
        nccl: whether NCCL is ready over these ranks (:func:`nccl_ready`).
        cuda_aware: whether MPI takes device buffers (:func:`cuda_aware_mpi`).
        requested: ``auto`` (NCCL, else CUDA-aware MPI, else host, for CUDA tensors; host
            for others) or a backend name, which must be usable here.

    Returns:
        ``none`` (one rank), ``host``, ``cuda-aware-mpi`` or ``nccl``.
    """
    if requested not in BACKENDS:
        raise UserError(f"reduction backend = {requested!r}: not one of {', '.join(BACKENDS)}")
    if size <= 1:
        return "none"
    on_device = device_type == "cuda"
    usable = {"host": True, "nccl": on_device and nccl, "cuda-aware-mpi": on_device and cuda_aware}
    if requested != "auto":
        if not usable[requested]:
            raise UserError(f"reduction backend = {requested!r} is not usable for {device_type} tensors here "
                            f"(NCCL ready: {nccl}, CUDA-aware MPI: {cuda_aware})")
        return requested
    for name in ("nccl", "cuda-aware-mpi"):
        if usable[name]:
            return name
    return "host"


class Reducer:
    """In-place sums over the ranks of ``comm`` of tensors on one device.

    Args:
        comm: mpi4py communicator (None = one process).
        device: where the tensors live.
        backend: ``auto`` or a backend name (:func:`choose_backend`).
        perf: optional object with ``comm_timer()`` charged with the time.

    The backend is chosen once, at construction (the detection is collective-free and the
    same on every rank of a homogeneous job).
    """

    def __init__(self, comm: Any, device: torch.device | str = "cpu", backend: str = "auto",
                 perf: Any = None) -> None:
        self.comm = comm
        self.device = torch.device(device)
        self.perf = perf
        size = 1 if comm is None else int(comm.Get_size())
        on_device = self.device.type == "cuda"
        self.backend = choose_backend(self.device.type, size,
                                      nccl=on_device and nccl_ready(size),
                                      cuda_aware=on_device and cuda_aware_mpi(), requested=backend)

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` by its sum over the ranks and return it.

        Args:
            tensor: on this reducer's device (any layout; a non-contiguous one goes through
                a contiguous copy).

        Returns:
            ``tensor`` itself, holding ``sum_r tensor_r``.
        """
        if self.backend == "none":
            return tensor
        if self.backend == "host":
            return allreduce_sum(self.comm, tensor, perf=self.perf)
        if self.perf is not None:
            with self.perf.comm_timer():
                return self._device_allreduce(tensor)
        return self._device_allreduce(tensor)

    def _device_allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        if self.backend == "nccl":
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        else:
            from mpi4py import MPI

            torch.cuda.current_stream(buf.device).synchronize()  # MPI reads the buffer outside the stream
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor
