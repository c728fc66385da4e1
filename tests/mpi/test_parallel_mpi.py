"""The thin MPI layer under 1, 2 and 3 ranks."""
import numpy as np
import pytest
import torch

from hpcqml.parallel import allreduce_sum, bcast, block_bounds, world
from hpcqml.perf import StagePerf

pytestmark = pytest.mark.timeout(120)


def test_allreduce_sum_numpy_and_torch():
    comm = world()
    size, rank = comm.Get_size(), comm.Get_rank()
    perf = StagePerf("t")
    a = np.arange(5, dtype=np.float64) * (rank + 1)
    allreduce_sum(comm, a, perf)
    np.testing.assert_array_equal(a, np.arange(5) * size * (size + 1) / 2)
    t = torch.full((3, 2), float(rank), dtype=torch.float32)
    allreduce_sum(comm, t, perf)
    assert torch.equal(t, torch.full((3, 2), float(sum(range(size)))))
    view = torch.ones(4, 4, dtype=torch.float64)[:, 1]   # non-contiguous: reduced through a copy
    allreduce_sum(comm, view, perf)
    assert torch.equal(view, torch.full((4,), float(size), dtype=torch.float64))
    if size > 1:
        assert perf.comm_seconds > 0


def test_bcast_and_blocks():
    comm = world()
    assert bcast(comm, {"x": comm.Get_rank()})["x"] == 0
    size = comm.Get_size()
    for n in (0, 1, 7, 10):
        bounds = [block_bounds(n, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # neighbouring pairs
        lengths = [hi - lo for lo, hi in bounds]
        assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_decide_on_root_gives_every_rank_rank_0s_answer():
    from hpcqml.errors import UserError
    from hpcqml.parallel import decide_on_root

    comm = world()
    assert decide_on_root(comm, lambda: comm.Get_rank() + 10) == 10   # only rank 0 decides
    def fail():
        raise UserError("nothing there")
    with pytest.raises(UserError, match="nothing there"):
        decide_on_root(comm, fail)


def test_thread_choice_under_several_ranks():
    """OMP_NUM_THREADS and SLURM_CPUS_PER_TASK are per rank already (never divided again);
    PBS NCPUS and the affinity mask are shared by the ranks on a node."""
    import os

    from hpcqml.runner import choose_threads

    comm = world()
    on_node = comm.Split_type(__import__("mpi4py").MPI.COMM_TYPE_SHARED).Get_size()
    assert choose_threads(comm, 0, {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert choose_threads(comm, 0, {"SLURM_CPUS_PER_TASK": "3"}) == (3, "SLURM_CPUS_PER_TASK")
    assert choose_threads(comm, 0, {"PBS_JOBID": "1.pbs", "NCPUS": "12"}) == (
        max(1, 12 // on_node), "PBS NCPUS / ranks on the node")
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(comm, 0, {}) == (max(1, cores // on_node), "affinity mask / ranks on the node")
