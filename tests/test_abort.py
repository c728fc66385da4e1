"""An exception on one rank takes every rank down (MPI_Abort) instead of a deadlock."""
import subprocess
import sys
import textwrap

from conftest import child_env, mpiexec, run_cli

SCRIPT = textwrap.dedent("""
    import time
    from mpi4py import MPI
    from hpcqml.parallel import run_on_all_ranks

    def work(comm):
        if comm.Get_rank() == 1:
            time.sleep(0.5)
            raise ValueError("rank one failed on purpose")
        comm.Barrier()          # the other ranks would wait here for ever
        time.sleep(120)

    run_on_all_ranks(work, MPI.COMM_WORLD, MPI.COMM_WORLD)
""")


def test_failure_on_rank_1_of_3_aborts_all(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(SCRIPT)
    # mpirun returns only once every rank has ended, and ranks 0 and 2 wait in a barrier that
    # rank 1 never reaches: any return at all means the abort reached them (without it the run
    # hangs until the generous timeout). No wall-clock threshold is asserted.
    res = subprocess.run([*mpiexec(), "-n", "3", sys.executable, str(script)], capture_output=True,
                         text=True, timeout=300, env=child_env())
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("hpcqml: error")]
    assert lines == ["hpcqml: error (rank 1 of 3): ValueError: rank one failed on purpose"]


def test_cli_config_error_is_one_line_under_mpi(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[run]\nstages = ["nonexistent"]\n')
    res = run_cli("run", str(cfg), ranks=2, timeout=120)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("hpcqml: error")]
    assert len(errors) == 1 and "unknown stage 'nonexistent'" in errors[0]


STOP_SCRIPT = textwrap.dedent("""
    import time
    from mpi4py import MPI
    from hpcqml.parallel import run_on_all_ranks
    from hpcqml.training.signals import StoppedBySignal

    def work(comm):
        if comm.Get_rank() == 0:
            time.sleep(1.5)     # rank 0 is the slowest to notice: the others must still stay silent
        raise StoppedBySignal(f"stopped by SIGTERM at step 3 (rank {comm.Get_rank()}); state saved")

    run_on_all_ranks(work, MPI.COMM_WORLD, MPI.COMM_WORLD)
""")


def test_stop_by_signal_is_reported_by_rank_0_only(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    res = subprocess.run([*mpiexec(), "-n", "3", sys.executable, str(script)], capture_output=True,
                         text=True, timeout=90, env=child_env())
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("hpcqml: error")]
    assert len(lines) == 1 and "(rank 0)" in lines[0] and "state saved" in lines[0], res.stderr
