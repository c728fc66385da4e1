"""The command line as users meet it: help, validate, info, one-line errors."""
import h5py
import pytest

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
    # a flag-only option before the config path does not swallow it, in any subcommand
    for command in ("validate", "run", "spectrum", "qcm"):
        ours, petsc = split_petsc_options([command, "-ksp_monitor", "c.toml", "-qcm_ksp_type", "cg"])
        assert ours == [command, "c.toml"] and petsc == ["-ksp_monitor", "-qcm_ksp_type", "cg"]
    ours, petsc = split_petsc_options(["-log_view", "info", "r.h5"])
    assert ours == ["info", "r.h5"] and petsc == ["-log_view"]


def test_petsc_options_reach_the_solver(tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/q.h5"\nstages = ["qcm"]\n'
                   '[qcm]\nn = 2\nN = [1]\nT = 3\nstep_sizes = []\n')
    res = run_cli("run", str(cfg), "-qcm_ksp_type", "richardson", "--quiet")
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "q.h5", "r") as fh:
        attrs = fh["qcm/f1.000_seed0/N_1"].attrs
        assert attrs["ksp_type"] == "richardson" and attrs["ksp_reason"] > 0


QCM = '[run]\noutput = "{out}"\nstages = ["qcm"]\n[qcm]\nn = 2\nN = [1]\nT = 3\nstep_sizes = []\n'


def test_validate_with_petsc_option_before_config_and_quiet_after_command(repo):
    res = run_cli("validate", "-ksp_monitor", str(repo / "jobs/configs/demo.toml"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "valid; sha256" in res.stdout


def test_bad_petsc_value_is_one_line_naming_it_and_unused_options_warned(tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text(QCM.format(out=tmp_path / "q.h5"))
    res = run_cli("run", "--quiet", str(cfg), "-qcm_ksp_type", "gmrez")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line == ("hpcqml: error: PETSc rejected an option value (unknown type, PETSc error 86); "
                    "options given: -qcm_ksp_type gmrez")
    res = run_cli("run", "--quiet", str(cfg), "--overwrite", "-ksp_tpye", "gmres", "-qcm_ksp_rtol", "1e-10")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]  # printed with --quiet too
    assert len(warnings) == 1 and "-ksp_tpye gmres" in warnings[0] and "qcm_ksp_rtol" not in warnings[0]
    import h5py

    with h5py.File(tmp_path / "q.h5", "r") as fh:
        assert fh.attrs["prov_petsc_options"] == "-ksp_tpye gmres -qcm_ksp_rtol 1e-10"
        assert fh.attrs["prov_command_line"].endswith("-ksp_tpye gmres -qcm_ksp_rtol 1e-10")


def test_help_validate_and_info_import_no_heavy_module(tmp_path, repo):
    """--help, validate and info are the commands users type interactively (fast start): none
    of torch, matplotlib, mpi4py, petsc4py is imported on their paths."""
    import subprocess
    import sys

    from conftest import child_env

    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/d.h5"\nstages = ["data"]\n'
                   '[data]\nsynth_train = 100\nsynth_test = 20\nsynth_classes = 3\n')
    assert run_cli("--quiet", "run", str(cfg)).returncode == 0
    probe = ("import sys, contextlib, io\nfrom hpcqml.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'matplotlib', 'mpi4py', 'petsc4py') if m in sys.modules))")
    for args in (["--help"], ["info", str(tmp_path / "d.h5")], ["run", "--help"],
                 ["validate", "jobs/configs/demo.toml"], ["validate", "--explain", "jobs/configs/demo.toml"],
                 ["validate", str(cfg)]):
        res = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                             env=child_env(), cwd=repo)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines()[-1] == "[]", (args, res.stdout)


def test_help_documents_petsc_prefixes():
    res = run_cli("--help")
    assert "-qcm_ksp_" in res.stdout and "-hhl_ksp_" in res.stdout


def test_validate_explain_prints_key_docs(repo):
    res = run_cli("validate", "--explain", str(repo / "jobs/configs/demo.toml"))
    assert res.returncode == 0, res.stderr
    assert "[spectrum]" in res.stdout
    # the config sets lanczos_steps = 20 and micro_batch = 64: shown beside the defaults
    assert "  lanczos_steps: value 20; integer; default 100; >= 1" in res.stdout
    assert "Lanczos steps m per probe" in res.stdout
    assert "  micro_batch: value 64; integer; default 512; >= 1 (not in the fingerprint)" in res.stdout


def test_validate_finds_what_would_fail_later(tmp_path):
    cfg = tmp_path / "v.toml"
    cfg.write_text('[run]\nstages = ["pretrain"]\n[pretrain]\nmodel = "resnet99"\n')
    res = run_cli("validate", str(cfg))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "pretrain.model" in res.stderr and "resnet99" in res.stderr
    cfg.write_text(f'[run]\nstages = ["data"]\n[data]\nsource = "cifar100"\nroot = "{tmp_path}/nothing"\n')
    res = run_cli("validate", str(cfg))
    assert res.returncode == 2 and "data.root" in res.stderr and "not found" in res.stderr
    cfg.write_text('[run]\nstages = ["spectrum"]\n[pretrain]\nmodel = "resnet8-w1"\n'
                   '[spectrum]\nlanczos_steps = 1000000\n')
    res = run_cli("validate", str(cfg), "--ranks", "2", "--memory-per-rank", "4")
    assert res.returncode == 0, res.stderr
    # float32 state: 1e6 steps x ceil(83,892 / 2) values x 4 bytes = 1.678e11 bytes
    assert ("# estimate: spectrum: Lanczos basis 1000000 x 83,892 parameters (resnet8-w1) x 4 bytes / 2 rank(s) "
            "= 156.26 GiB per rank") in res.stdout
    warning = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "Lanczos basis needs" in warning[0] and "50%" in warning[0]
    assert "Krylov bases on disk" not in res.stdout   # the step budget cannot grow: auto writes none
    # a budget that can grow: 4 probes x (40 + 2) vectors x 83,892 x 4 bytes = 5.637e7 bytes
    cfg.write_text('[run]\nstages = ["spectrum"]\n[pretrain]\nmodel = "resnet8-w1"\n'
                   '[spectrum]\nlanczos_steps = 20\nmax_lanczos_steps = 40\nprobes = 4\n')
    res = run_cli("validate", str(cfg))
    assert res.returncode == 0, res.stderr
    assert ("# estimate: spectrum: Krylov bases on disk (keep_bases = 'auto'): up to 0.05 GiB per model state "
            "and operator in <workdir>/spectrum-bases (4 probe(s) x 40 steps + 2 vectors x 83,892 x 4 bytes; "
            "a file being rewritten needs its size again)"
            ) in res.stdout
    # hhl: n = 6, N = 3 -> Delta = 258, (T + 1) Delta = 1,032 rows, dilated and padded: D = 4,096
    cfg.write_text('[run]\nstages = ["hhl"]\n[hhl]\nn = 6\nN = 3\nmax_dim = 8192\nclock_qubits = [16]\n')
    res = run_cli("validate", str(cfg), "--memory-per-rank", "1")
    assert res.returncode == 0, res.stderr
    assert "hhl: case random: 1,032 rows, embedded D = 4,096" in res.stdout
    warning = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "hhl: case random needs" in warning[0] and "50%" in warning[0]
    cfg.write_text('[run]\nstages = ["qcm"]\ndevice = "cuda"\n')
    res = run_cli("validate", str(cfg), env={"CUDA_VISIBLE_DEVICES": ""})     # no GPU visible
    assert res.returncode == 2 and "run.device = 'cuda' but torch sees no CUDA device" in res.stderr
    cfg.write_text('[run]\nstages = ["qcm"]\n[qcm]\nn = 4\nN = [1, 2, 3]\n')
    res = run_cli("validate", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "Carleman rows Delta = 84 at N = 3 (n = 4)" in res.stdout     # 4 + 16 + 64


def test_info_tree_puts_provenance_apart_and_decodes_strings(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/d.h5"\nstages = ["data"]\n'
                   '[data]\nsynth_train = 100\nsynth_test = 20\nsynth_classes = 3\n')
    assert run_cli("--quiet", "run", str(cfg)).returncode == 0
    res = run_cli("info", "--all", str(tmp_path / "d.h5"))
    assert res.returncode == 0, res.stderr
    groups = res.stdout.split("\ngroups:\n", 1)[1]
    assert not any(line.lstrip().startswith(("run_0", "provenance/")) for line in groups.splitlines())
    assert "b'" not in res.stdout
    assert "invocations: 1 (000 completed)" in res.stdout



@pytest.mark.parametrize("body, message", [
    ('[data]\nsynth_train = 40\n[pretrain]\nbatch_size = 41\n',
     "[pretrain] batch_size = 41 is larger than the data set's 40 training images"),
    ('[data]\nsynth_train = 40\n[pretrain]\nbatch_size = 8\n[train]\nbatch_size = 2048\n',
     "[train] batch_size = 2048 is larger than the data set's 40 training images"),
    ('[data]\nsource = "cifar100"\nroot = "{root}"\n[pretrain]\nbatch_size = 8\n[train]\nbatch_size = 60000\n',
     "[train] batch_size = 60000 is larger than the data set's 50000 training images"),
    ('[train]\nsteps = 4\nsnapshot_steps = [3, 9]\n',
     "[train] snapshot_steps has step 9, beyond steps = 4"),
    ('[data]\nsynth_train = 40\nsynth_classes = 50\n[pretrain]\nbatch_size = 8\n[train]\nbatch_size = 8\n',
     "[data] synth_classes = 50 is larger than synth_train = 40"),
    ('[data]\nsynth_train = 40\n[pretrain]\nbatch_size = 1\n[train]\nbatch_size = 8\n',
     "[pretrain] batch_size = 1 is smaller than the 2 ranks"),
])
def test_validate_refuses_sizes_the_data_cannot_fill(tmp_path, body, message):
    from hpcqml.data.synth import write_synthetic

    write_synthetic(tmp_path / "cifar", 10, 10, 2)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nstages = ["data", "pretrain", "prune", "train"]\n' + body.format(root=tmp_path / "cifar"))
    res = run_cli("validate", str(cfg), "--ranks", "2")
    assert res.returncode == 2, res.stdout[-500:]
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
