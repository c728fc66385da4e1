"""The command line as users meet it: help, validate, info, one-line errors."""
import h5py

from conftest import run_cli


def test_help_lists_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for command in ("run", "validate", "info"):
        assert command in res.stdout


def test_validate_demo_config_and_errors(tmp_path, repo):
    res = run_cli("validate", str(repo / "jobs/configs/demo.toml"))
    assert res.returncode == 0, res.stderr
    assert "valid; sha256" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nseed = 'x'\n")
    res = run_cli("validate", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip() == f"hpcqml: error: config {bad}: [run] seed = 'x': expected integer, got string"
    res = run_cli("--debug", "validate", str(bad))
    assert "Traceback" in res.stderr


def test_info_on_malformed_files(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    res = run_cli("info", str(bad))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "not a readable HDF5 file" in res.stderr
    res = run_cli("info", str(tmp_path / "missing.h5"))
    assert res.returncode == 2 and "not found" in res.stderr
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["x"] = 1
    res = run_cli("info", str(other))
    assert res.returncode == 2 and "not an hpcqml results file" in res.stderr


def test_petsc_options_are_split_off():
    from hpcqml.cli import split_petsc_options

    ours, petsc = split_petsc_options(["run", "c.toml", "-ksp_type", "gmres", "--quiet", "-log_view",
                                       "--set", "a.b=1", "-h"])
    assert ours == ["run", "c.toml", "--quiet", "--set", "a.b=1", "-h"]
    assert petsc == ["-ksp_type", "gmres", "-log_view"]


def test_petsc_options_reach_the_solver(tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/q.h5"\nstages = ["qcm"]\n'
                   '[qcm]\nn = 2\nN = [1]\nT = 3\nstep_sizes = []\n')
    res = run_cli("--quiet", "run", str(cfg), "-ksp_type", "richardson")
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "q.h5", "r") as fh:
        attrs = fh["qcm/f1.000_seed0/N_1"].attrs
        assert attrs["ksp_type"] == "richardson" and attrs["ksp_reason"] > 0
