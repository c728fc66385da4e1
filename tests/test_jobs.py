"""``hpcqml jobs render``: SLURM/PBS scripts that are valid shell, carry the requested
resources, forward the warning signal to the ranks and requeue, treat SIGTERM (a cancel)
as stop-without-requeue, and leave no helper process behind; the scripts are run here with
the SLURM/PBS environment variables set and fake ``scontrol``/``qsub`` on PATH (no
scheduler server exists on the test machine)."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TRAINING, run_cli
from hpcqml.errors import UserError
from hpcqml.jobs import add_arguments, cli_main
from hpcqml.jobs.render import STANDARD, standard_specs
from hpcqml.training.checkpoint import load_checkpoint

VENV = REPO / ".venv"

TINY = """[run]
name = "tiny"
output = "results/tiny.h5"
stages = ["data"]
threads = 1
[data]
synth_train = 64
synth_test = 16
synth_classes = 4
"""

FAKE_LAUNCH = """#!/bin/bash
# stand-in for srun/mpirun: records its arguments and what the ranks would be told, then
# waits for SIGUSR1 or SIGTERM (a rank that checkpoints and stops) or gives up after 20 s;
# 'note:' is what the job script noted as the signal it received (USR1 or TERM)
echo "args: $*" >> "$FAKE_LOG"
echo "env: HPCQML_BATCH=${HPCQML_BATCH:-} HPCQML_REQUEUE=${HPCQML_REQUEUE:-}" >> "$FAKE_LOG"
echo "note-file: ${HPCQML_STOP_NOTE:-}" >> "$FAKE_LOG"
trap 'echo "got USR1" >> "$FAKE_LOG"; echo "note: $(cat "$HPCQML_STOP_NOTE")" >> "$FAKE_LOG"; exit 0' USR1
trap 'echo "got TERM" >> "$FAKE_LOG"; exit 0' TERM
# the real ranks write "stopped" to the note when they leave unfinished, and exit 0
trap '[ -n "${HPCQML_STOP_NOTE:-}" ] && echo stopped >> "$HPCQML_STOP_NOTE"' EXIT
for i in $(seq 1 200); do sleep 0.1; done
echo "no signal" >> "$FAKE_LOG"
exit 3
"""

FAKE_TOOL = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
"""


def jobs(*argv: str) -> int:
    """Run ``hpcqml jobs ARGV`` in this process (the CLI wiring is tested separately)."""
    parser = argparse.ArgumentParser(prog="hpcqml jobs")
    add_arguments(parser)
    return cli_main(parser.parse_args(list(argv)))


def bash_n(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"{path}: {res.stderr}"


def directives(text: str, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    return cfg


@pytest.fixture
def fakes(tmp_path: Path) -> dict:
    """A fake launcher, fake scontrol/qsub on PATH, and the log they write to."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    launch = bindir / "fake-launch"
    launch.write_text(FAKE_LAUNCH)
    for name in ("scontrol", "qsub"):
        (bindir / name).write_text(FAKE_TOOL)
    for p in bindir.iterdir():
        p.chmod(0o755)
    log = tmp_path / "fake.log"
    return {"launch": str(launch), "log": log,
            "env": dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                        LAUNCH=str(launch), HPCQML_VENV=str(VENV))}


def test_slurm_render_carries_resources_and_is_valid_shell(tmp_path, tiny, capsys):
    out = tmp_path / "job.sbatch"
    assert jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "2", "--ranks-per-node", "4",
                "--gpus-per-node", "2", "--cpus-per-rank", "3", "--time", "01:30:00", "--mem", "64GB",
                "--partition", "gpu", "--account", "proj7", "--set", "data.synth_train=80",
                "--out", str(out)) == 0
    bash_n(out)
    assert os.access(out, os.X_OK)
    text = out.read_text()
    d = directives(text, "#SBATCH")
    for want in ("--job-name=tiny", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=3",
                 "--gpus-per-node=2", "--mem=64G", "--time=01:30:00", "--signal=B:USR1@300", "--requeue",
                 "--partition=gpu", "--account=proj7", "--output=results/tiny-%j.out"):
        assert want in d, (want, d)
    # every directive precedes the first command, or sbatch ignores it
    first_cmd = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert 'source "$HPCQML_VENV/bin/activate"' in text
    assert "scontrol requeue" in text and "trap 'forward USR1' USR1" in text


def test_slurm_dry_run_prints_the_launch(tmp_path, tiny, fakes):
    out = tmp_path / "job.sbatch"
    jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "3",
         "--time", "00:10:00", "--stages", "data", "--out", str(out))
    env = dict(fakes["env"], HPCQML_DRY_RUN="1", SLURM_JOB_ID="41", SLURM_NTASKS="3",
               SLURM_SUBMIT_DIR=str(tmp_path), LAUNCH="mpirun --allow-run-as-root")
    res = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(
        f"HPCQML_DRY_RUN: mpirun --allow-run-as-root -n 3 hpcqml run {tiny} --output results/tiny.h5 "
        f"--stages data"), res.stdout
    assert (tmp_path / "results").is_dir()   # ran in SLURM_SUBMIT_DIR and made the results folder


def test_pbs_render_and_dry_run_with_pbs_environment(tmp_path, tiny, fakes):
    out = tmp_path / "job.pbs"
    assert jobs("render", str(tiny), "--scheduler", "pbs", "--nodes", "2", "--ranks-per-node", "4",
                "--gpus-per-node", "1", "--cpus-per-rank", "2", "--time", "12:00:00", "--mem", "500M",
                "--partition", "workq", "--out", str(out)) == 0
    bash_n(out)
    text = out.read_text()
    d = directives(text, "#PBS")
    for want in ("-N tiny", "-l select=2:ncpus=8:mpiprocs=4:ompthreads=2:ngpus=1:mem=500mb",
                 "-l walltime=12:00:00", "-r y", "-q workq"):
        assert want in d, (want, d)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("n1\n" * 4 + "n2\n" * 4)
    work = tmp_path / "submitdir"
    work.mkdir()
    env = dict(fakes["env"], HPCQML_DRY_RUN="1", PBS_O_WORKDIR=str(work), PBS_NODEFILE=str(nodefile),
               PBS_JOBID="123.pbs-server", PBS_JOBNAME="tiny", PBS_ENVIRONMENT="PBS_BATCH")
    del env["LAUNCH"]
    res = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"HPCQML_DRY_RUN: mpirun( --allow-run-as-root)? --hostfile {nodefile} -n 8 "
                        rf"hpcqml run {tiny} --output results/tiny.h5", line), line
    assert (work / "results").is_dir()
    assert not fakes["log"].exists()          # nothing launched, nothing resubmitted


def test_pbs_warning_timer_checkpoints_and_resubmits(tmp_path, tiny, fakes):
    """The PBS stand-in for --signal: a timer raises SIGUSR1 LEAD s before the wall time;
    the script forwards it to the launcher and resubmits itself with qsub."""
    out = tmp_path / "job.pbs"
    jobs("render", str(tiny), "--scheduler", "pbs", "--nodes", "1", "--ranks-per-node", "2",
         "--time", "01:00:00", "--signal-lead", "300", "--out", str(out))
    env = dict(fakes["env"], PBS_O_WORKDIR=str(tmp_path), PBS_JOBID="77.srv", HPCQML_WALL_SECONDS="302")
    res = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert res.returncode == 0, res.stdout + res.stderr
    # The event, not the elapsed time: the launcher logs "got USR1" only when the timer's signal
    # reached it (without it the fake launcher ends after 20 s with no such line), checked below.
    log = fakes["log"].read_text().splitlines()
    assert log[0] == f"args: -n 2 hpcqml run {tiny} --output results/tiny.h5"
    assert "got USR1" in log and "env: HPCQML_BATCH=pbs HPCQML_REQUEUE=1" in log
    # the next segment logs to its own file instead of overwriting this one's
    assert f"qsub -W depend=afterany:77.srv -v HPCQML_SEGMENT=2 -o results/tiny-seg2.pbs.log {out}" in log
    assert "-o results/tiny-seg1.pbs.log" in directives(out.read_text(), "#PBS")
    assert "got SIGUSR1" in res.stdout and "requeueing" in res.stdout
    # a resubmitted segment names the one after it
    fakes["log"].unlink()
    env["HPCQML_SEGMENT"] = "2"
    res = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=60, cwd="/")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "-v HPCQML_SEGMENT=3 -o results/tiny-seg3.pbs.log" in fakes["log"].read_text()


def _note_file(log: list[str]) -> Path:
    """The stop-note file the job script made (it must be gone when the script has ended)."""
    return Path(next(line for line in log if line.startswith("note-file: ")).split(": ", 1)[1])


def _sleeps(seconds: int) -> list[int]:
    """Pids of live ``sleep SECONDS`` processes (the PBS timer's helper)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if argv[:2] == [b"sleep", str(seconds).encode()] and state != "Z":
            pids.append(int(proc.name))
    return pids


def _run_until_launched(script: Path, env: dict, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd="/")
    deadline = time.monotonic() + 120   # generous: a loaded 2-core machine
    while not (log.exists() and "args:" in log.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "launcher never started"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("requeue", ["1", "0"])
def test_slurm_batch_shell_forwards_usr1_and_requeues(tmp_path, tiny, fakes, requeue):
    """--signal=B:USR1 reaches the batch shell only: it must reach the ranks too."""
    out = tmp_path / "job.sbatch"
    jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "2",
         "--time", "00:20:00", "--out", str(out))
    env = dict(fakes["env"], SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(tmp_path),
               HPCQML_REQUEUE=requeue)
    proc = _run_until_launched(out, env, fakes["log"])
    os.kill(proc.pid, signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    # unfinished and not requeued: the job fails (afterok dependencies must not start)
    assert proc.returncode == (0 if requeue == "1" else 2), stdout
    log = fakes["log"].read_text().splitlines()
    assert "got USR1" in log
    assert ("scontrol requeue 42" in log) == (requeue == "1"), log
    assert "launcher exited with status 0" in stdout


def test_slurm_sigterm_stops_without_requeue(tmp_path, tiny, fakes):
    """scancel sends SIGTERM: forwarded to the ranks, which checkpoint and stop; no requeue."""
    out = tmp_path / "job.sbatch"
    jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "2",
         "--time", "00:20:00", "--out", str(out))
    env = dict(fakes["env"], SLURM_JOB_ID="43", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(tmp_path))
    proc = _run_until_launched(out, env, fakes["log"])
    os.kill(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, stdout         # cancelled unfinished: the job fails
    log = fakes["log"].read_text().splitlines()
    # the ranks are asked with SIGUSR1 (mpirun aborts on a second SIGTERM) and read the cancel
    assert "got USR1" in log and "note: TERM" in log and "env: HPCQML_BATCH=slurm HPCQML_REQUEUE=1" in log
    assert not any(line.startswith("scontrol") for line in log), log
    assert not _note_file(log).exists()
    assert "got SIGTERM (cancel)" in stdout and "requeueing" not in stdout
    last = stdout.strip().splitlines()[-1]
    assert "cancelled (SIGTERM); saved the checkpoints in results/tiny.h5" in last and "not requeued" in last


def test_slurm_cancel_after_warning_does_not_requeue(tmp_path, tiny, fakes):
    """A cancel is final: SIGTERM after the wall-time warning still means no requeue."""
    out = tmp_path / "job.sbatch"
    jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "2",
         "--time", "00:20:00", "--out", str(out))
    slow = Path(fakes["launch"]).parent / "slow-launch"        # stops only once told of the cancel
    slow.write_text(FAKE_LAUNCH.replace('>> "$FAKE_LOG"; exit 0\' USR1',
                                        '>> "$FAKE_LOG"; [ "$(cat "$HPCQML_STOP_NOTE")" = TERM ] && exit 0\' USR1'))
    slow.chmod(0o755)
    env = dict(fakes["env"], SLURM_JOB_ID="44", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(tmp_path),
               LAUNCH=str(slow))
    proc = _run_until_launched(out, env, fakes["log"])
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120   # generous: a loaded 2-core machine
    while "got USR1" not in fakes["log"].read_text():
        assert time.monotonic() < deadline, "USR1 never reached the launcher"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    log = fakes["log"].read_text().splitlines()
    assert log.count("got USR1") == 2 and log[-1] == "note: TERM", log
    assert not any(line.startswith("scontrol") for line in log), log
    assert "not requeued" in stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("sig, requeued", [(signal.SIGTERM, False), (signal.SIGUSR1, True)])
def test_pbs_signals_and_no_leftover_timer(tmp_path, tiny, fakes, sig, requeued):
    """qdel sends SIGTERM: stop without resubmission; SIGUSR1 (as the timer would send it)
    resubmits.  Either way the timer's sleep is gone when the script ends."""
    out = tmp_path / "job.pbs"
    jobs("render", str(tiny), "--scheduler", "pbs", "--nodes", "1", "--ranks-per-node", "2",
         "--time", "01:00:00", "--signal-lead", "300", "--out", str(out))
    lead = 300
    wait = 86_000 + os.getpid() % 997 + (1 if requeued else 0)   # a sleep length no one else uses
    env = dict(fakes["env"], PBS_O_WORKDIR=str(tmp_path), PBS_JOBID="78.srv",
               HPCQML_WALL_SECONDS=str(wait + lead))
    proc = _run_until_launched(out, env, fakes["log"])
    deadline = time.monotonic() + 120   # generous: a loaded 2-core machine
    while not _sleeps(wait):
        assert time.monotonic() < deadline, "the timer never started"
        time.sleep(0.2)
    os.kill(proc.pid, sig)
    stdout, _ = proc.communicate(timeout=30)
    leftover = _sleeps(wait)
    for pid in leftover:                     # ours (unique length): clean up, then fail
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"timer sleep left behind: {leftover}"
    assert proc.returncode == (0 if requeued else 2), stdout
    log = fakes["log"].read_text().splitlines()
    qsubs = [line for line in log if line.startswith("qsub")]
    assert "got USR1" in log and ("note: USR1" if requeued else "note: TERM") in log
    assert bool(qsubs) == requeued, log
    assert not _note_file(log).exists()
    last = stdout.strip().splitlines()[-1]
    assert ("requeueing" in last) == requeued and "saved the checkpoints in results/tiny.h5" in last


def test_slurm_threads_follow_cpus_per_task(tmp_path, tiny, fakes):
    """OMP_NUM_THREADS: as set, else SLURM_CPUS_PER_TASK, else the rendered cores per rank."""
    out = tmp_path / "job.sbatch"
    jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "2",
         "--cpus-per-rank", "3", "--time", "00:20:00", "--out", str(out))
    base = dict(fakes["env"], HPCQML_DRY_RUN="1", SLURM_SUBMIT_DIR=str(tmp_path))
    base.pop("OMP_NUM_THREADS", None)
    for extra, want in (({}, "3"), ({"SLURM_CPUS_PER_TASK": "5"}, "5"),
                        ({"SLURM_CPUS_PER_TASK": "5", "OMP_NUM_THREADS": "2"}, "2")):
        script = out.read_text().replace('  echo "HPCQML_DRY_RUN: ${launch_cmd[*]}"',
                                         '  echo "HPCQML_DRY_RUN: ${launch_cmd[*]}"; echo "threads=$OMP_NUM_THREADS"')
        res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=dict(base, **extra),
                             timeout=60, cwd="/")
        assert res.returncode == 0, res.stderr
        assert f"threads={want}" in res.stdout, (extra, res.stdout)


def test_scaling_writes_one_job_per_rank_count(tmp_path, tiny, capsys):
    out = tmp_path / "scaling"
    assert jobs("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "4",
                "--time", "00:30:00", "--scaling", "1,2,4,8,12", "--out", str(out)) == 0
    scripts = sorted(out.glob("*.sbatch"))
    assert [p.name for p in scripts] == sorted(f"tiny-n{n}.sbatch" for n in (1, 2, 4, 8, 12))
    expect = {1: (1, 1, 1), 2: (1, 2, 2), 4: (1, 4, 4), 8: (2, 8, 4), 12: (3, 12, 4)}
    outputs = set()
    for n, (nodes, ntasks, rpn) in expect.items():
        path = out / f"tiny-n{n}.sbatch"
        bash_n(path)
        d = directives(path.read_text(), "#SBATCH")
        assert {f"--nodes={nodes}", f"--ntasks={ntasks}", f"--ntasks-per-node={rpn}"} <= set(d), d
        m = re.search(r"^CMD=\(hpcqml run \S+ --output (\S+)\)$", path.read_text(), re.M)
        assert m and m.group(1) == f"results/tiny-n{n}.h5"
        outputs.add(m.group(1))
    assert len(outputs) == 5
    submit = (out / "submit_all.sh").read_text()
    assert [line.split()[1] for line in submit.splitlines() if line.startswith("sbatch")] == \
        [str(out / f"tiny-n{n}.sbatch") for n in (1, 2, 4, 8, 12)]
    bash_n(out / "submit_all.sh")


def test_weak_scaling_pbs_scales_the_named_value(tmp_path, tiny):
    out = tmp_path / "weak"
    jobs("render", str(tiny), "--scheduler", "pbs", "--nodes", "1", "--ranks-per-node", "2",
         "--time", "00:30:00", "--scaling", "2,4,8", "--weak", "data.synth_train", "--out", str(out))
    for n, train in ((2, 64), (4, 128), (8, 256)):
        text = (out / f"tiny-n{n}.pbs").read_text()
        assert f"--set data.synth_train={train})" in text
        assert f"-l select={n // 2}:ncpus=2:mpiprocs=2:ompthreads=1" in directives(text, "#PBS")[1]
        assert f'HPCQML_JOB_SCRIPT="${{HPCQML_JOB_SCRIPT:-{out}/tiny-n{n}.pbs}}"' in text
    assert "qsub" in (out / "submit_all.sh").read_text()


@pytest.mark.parametrize("args, message", [
    (["--time", "1:00"], "expected HH:MM:SS"),
    (["--time", "00:04:00"], "not longer than the 300 s checkpoint warning"),
    (["--nodes", "0"], "--nodes 0: must be an integer >= 1"),
    (["--mem", "lots"], "--mem 'lots'"),
    (["--scaling", "1,x", "--out", "d"], "--scaling '1,x'"),
    (["--scaling", "1,2"], "name a directory with --out"),
    (["--weak", "data.synth_train"], "--weak needs --scaling"),
    (["--scaling", "3,4", "--weak", "data.synth_classes", "--out", "d"], "not an integer multiple"),
    (["--output", "results/x.txt"], "must end in .h5"),
    (["--name", "a b"], "--name 'a b'"),
])
def test_bad_input_is_a_user_error(tmp_path, tiny, args, message):
    base = {"--nodes": "1", "--ranks-per-node": "2", "--time": "01:00:00"}
    extra = list(args)
    for flag, value in base.items():
        if flag not in extra:
            extra += [flag, value]
    argv = ["render", str(tiny), "--scheduler", "slurm", *extra]
    argv = [str(tmp_path / a) if a == "d" else a for a in argv]
    with pytest.raises(UserError, match=re.escape(message)):
        jobs(*argv)


def test_cli_wiring_and_one_line_errors(tmp_path, tiny):
    res = run_cli("jobs", "render", str(tiny), "--scheduler", "pbs", "--nodes", "1", "--ranks-per-node", "2",
                  "--time", "00:30:00")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#!/bin/bash\n#PBS -N tiny\n")
    res = run_cli("jobs", "render", str(tmp_path / "missing.toml"), "--scheduler", "slurm", "--nodes", "1",
                  "--ranks-per-node", "2", "--time", "00:30:00")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "missing.toml: file not found" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nseed = -1\n")
    res = run_cli("jobs", "render", str(bad), "--scheduler", "slurm", "--nodes", "1",
                  "--ranks-per-node", "2", "--time", "00:30:00")
    assert res.returncode == 2 and "[run] seed" in res.stderr


def test_checked_in_scripts_are_current_and_valid(capsys):
    """jobs/slurm/*.sbatch and jobs/pbs/*.pbs are exactly what 'hpcqml jobs standard' writes."""
    assert jobs("standard", "--check", "--root", str(REPO)) == 0, capsys.readouterr().out
    for scheduler, prefix, wall in (("slurm", "#SBATCH", "--time="), ("pbs", "#PBS", "-l walltime=")):
        specs = standard_specs(scheduler)
        assert len(specs) == len(STANDARD)
        for rel, spec in specs:
            path = REPO / rel
            bash_n(path)
            text = path.read_text()
            d = directives(text, prefix)
            assert f"{wall}{spec.time}" in d
            assert f"--output {spec.output}" in text and spec.output.startswith("results/")
            assert "Sizing:" in text
    demo = (REPO / "jobs/slurm/demo.sbatch").read_text()
    assert {"--nodes=1", "--ntasks=2"} <= set(directives(demo, "#SBATCH"))


def test_checked_in_pbs_script_dry_run(tmp_path):
    """The Fig. 3 PBS script as a PBS mom would start it: 2 nodes x 4 ranks from the nodefile."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("g1\n" * 4 + "g2\n" * 4)
    env = dict(os.environ, HPCQML_DRY_RUN="1", PBS_O_WORKDIR=str(REPO), PBS_NODEFILE=str(nodefile),
               PBS_JOBID="9.srv", HPCQML_VENV=str(VENV))
    env.pop("LAUNCH", None)
    res = subprocess.run(["bash", str(REPO / "jobs/pbs/fig3-resnet56-w11.pbs")], capture_output=True,
                         text=True, env=env, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    assert re.search(rf"--hostfile {nodefile} -n 8 hpcqml run jobs/configs/resnet56-w11-cifar100.toml "
                     r"--output results/resnet56-w11-cifar100.h5$", res.stdout.strip()), res.stdout




def _signal_session(sid: int, sig: int) -> list[int]:
    """Send ``sig`` to every process of session ``sid``, as PBS and SLURM do on a cancel
    (Open MPI puts its ranks in process groups of their own, so killpg would miss them)."""
    hit = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            try:
                os.kill(int(proc.name), sig)
                hit.append(int(proc.name))
            except ProcessLookupError:
                pass
    return hit


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scheduler", ["pbs"])
def test_cancel_of_a_real_run_checkpoints_and_does_not_requeue(tmp_path, fakes, scheduler):
    """hpcqml under mpirun in a rendered script; the cancel as the scheduler delivers it:
    SIGTERM to every process of the job (batch shell, mpirun, ranks).  The ranks save
    their state and say so in one line, and nothing is resubmitted.  (PBS: mpirun is its
    launcher; the SLURM script shares this part, and tests/test_slurm.py runs it under a
    real SLURM.)"""
    from conftest import child_env

    cfg = tmp_path / "train.toml"
    cfg.write_text(TRAINING.format(out=tmp_path / "train.h5"))
    out = tmp_path / f"job.{scheduler}"
    jobs("render", str(cfg), "--scheduler", scheduler, "--nodes", "1", "--ranks-per-node", "2",
         "--time", "01:00:00", "--out", str(out))
    env = child_env(PATH=fakes["env"]["PATH"], FAKE_LOG=str(fakes["log"]), HPCQML_VENV=str(VENV),
                    LAUNCH="mpirun --allow-run-as-root --oversubscribe",
                    OMPI_MCA_odls_base_sigkill_timeout="5")   # the ranks got SIGTERM themselves
    env.update({"pbs": {"PBS_O_WORKDIR": str(tmp_path), "PBS_JOBID": "79.srv"},
                "slurm": {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "45", "SLURM_NTASKS": "2"}}[scheduler])
    proc = subprocess.Popen(["bash", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd="/", start_new_session=True)
    marker = tmp_path / "train.work" / "snapshots" / "step_000003.pt"
    deadline = time.monotonic() + 150
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "training never reached step 3"
        time.sleep(0.2)
    assert len(_signal_session(proc.pid, signal.SIGTERM)) >= 4      # shell, mpirun, 2 ranks (+ PBS timer)
    stdout, _ = proc.communicate(timeout=120)
    state = load_checkpoint(tmp_path / "train.work" / "train_state.pt")
    assert 3 <= state.step < 5000
    stop = [line for line in stdout.splitlines() if "stopped by" in line and "(rank 0 of 2)" in line]
    assert len(stop) == 1, stdout[-3000:]
    assert f"stopped by SIGTERM (cancel): train after step {state.step} of 5000; saved checkpoint " \
           f"{tmp_path / 'train.work' / 'train_state.pt'} (step {state.step}); no requeue" in stop[0]
    assert not fakes["log"].exists() or not any(
        line.startswith(("qsub", "scontrol")) for line in fakes["log"].read_text().splitlines())
    assert "cancelled (SIGTERM)" in stdout.strip().splitlines()[-1], stdout[-3000:]
