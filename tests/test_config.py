"""Config validation: every bad key, type and value is named in a one-line error."""
import pytest

from hpcqml.config import Field, dumps_toml, load_config
from hpcqml.errors import ConfigError
import tomllib

SCHEMAS = {
    "spectrum": {
        "batch_size": Field(int, 2048, min=1),
        "cutoff": Field(float, 0.4, min=0.0),
        "route": Field(str, "auto", choices=("auto", "func")),
        "steps": Field(list, [0], item=int, min=0, min_items=1),
        "smooth": Field(bool, True),
    }
}


def load(text: str, overrides=()):
    return load_config("test.toml", SCHEMAS, overrides, text=text)


def test_defaults_filled_and_int_accepted_for_float():
    cfg = load('[run]\nstages = ["spectrum"]\n[spectrum]\ncutoff = 1\n')
    assert cfg.sections["spectrum"] == {"batch_size": 2048, "cutoff": 1.0, "route": "auto",
                                        "steps": [0], "smooth": True}
    assert isinstance(cfg.sections["spectrum"]["cutoff"], float)


@pytest.mark.parametrize("text, fragment", [
    ("[spectrum]\nbatchsize = 3\n", "[spectrum] unknown key 'batchsize'"),
    ("[spectrum]\nbatch_size = 'big'\n", "[spectrum] batch_size = 'big': expected integer, got string"),
    ("[spectrum]\nbatch_size = true\n", "expected integer, got boolean"),
    ("[spectrum]\nbatch_size = 0\n", "[spectrum] batch_size = 0: must be >= 1"),
    ("[spectrum]\nroute = 'slow'\n", "[spectrum] route = 'slow': not one of 'auto', 'func'"),
    ("[spectrum]\nsteps = [1, -2]\n", "[spectrum] steps[1] = -2: must be >= 0"),
    ("[spectrum]\nsteps = 3\n", "expected a list"),
    ("[spectrum]\nsteps = []\n", "[spectrum] steps = []: needs at least 1 item(s)"),
    ("[spectrm]\nx = 1\n", "unknown section [spectrm]"),
    ("[run]\nstages = ['spectra']\n", "unknown stage 'spectra'"),
    ("[run]\nseed = -1\n", "[run] seed = -1: must be >= 0"),
    ("[run]\noutput = 'x.txt'\n", "must end in .h5"),
    ("[run\n", "not valid TOML"),
])
def test_bad_configs_rejected_with_named_key(text, fragment):
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert fragment in message
    assert message.startswith("config test.toml:")
    assert "\n" not in message


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/no/such/config.toml", SCHEMAS)


def test_overrides_and_hash():
    base = load("[run]\nseed = 1\n")
    changed = load("[run]\nseed = 1\n", ["spectrum.batch_size=64"])
    assert changed.sections["spectrum"]["batch_size"] == 64
    assert base.sha256() != changed.sha256()
    # the stage list and output path are not part of the fingerprint
    moved = load("[run]\nseed = 1\noutput = 'elsewhere.h5'\nstages = ['spectrum']\n")
    assert moved.sha256() == base.sha256()
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load("", ["batch_size=3"])


def test_resolved_toml_round_trips():
    cfg = load('[run]\nname = "a \\"quoted\\" name"\n[spectrum]\nsteps = [1, 2]\n')
    again = tomllib.loads(cfg.resolved_toml())
    assert again == cfg.sections
    assert tomllib.loads(dumps_toml({"run": {"x": 1.5}})) == {"run": {"x": 1.5}}


def test_result_keys_leave_out_defaults_and_performance_keys():
    """Only the Field flag decides: a key named like a real stage's performance key but
    not flagged changes the fingerprint; a flagged one never does."""
    sch = {"spectrum": {"probes": Field(int, 4), "micro_batch": Field(int, 512, affects_results=False),
                        "fast": Field(bool, False, affects_results=False)}}
    cfg = load_config("t.toml", sch,
                      text="[run]\nseed = 3\nthreads = 2\n[spectrum]\nprobes = 4\nmicro_batch = 8\nfast = true\n")
    assert cfg.result_keys("spectrum", sch["spectrum"]) == {}
    assert cfg.result_keys("run") == {"seed": 3}
    changed = load_config("t.toml", sch, text="[spectrum]\nprobes = 9\n")
    assert changed.result_keys("spectrum", sch["spectrum"]) == {"probes": 9}
    unflagged = {"spectrum": {**sch["spectrum"], "micro_batch": Field(int, 512)}}
    cfg = load_config("t.toml", unflagged, text="[spectrum]\nmicro_batch = 8\n")
    assert cfg.result_keys("spectrum", unflagged["spectrum"]) == {"micro_batch": 8}


def test_compare_inputs_names_old_and_new_values():
    from hpcqml.config import compare_inputs

    old = {"spectrum": {"probes": 4, "route": "x"}, "train": {}}
    new = {"spectrum": {"probes": 8}, "train": {"lr": 0.5}}
    assert compare_inputs(old, new) == ['spectrum.probes 4 -> 8', 'spectrum.route "x" -> (default)',
                                        "train.lr (default) -> 0.5"]


def test_explain_lists_every_key_with_type_default_and_doc():
    from hpcqml.config import explain

    text = explain(SCHEMAS)
    assert "[run]\n" in text and "[spectrum]\n" in text
    assert "  route: string; default \"auto\"; one of \"auto\", \"func\"" in text
    assert "  steps: list of integer; default [0]; >= 0" in text
    assert "  threads: integer; default 0; >= 0 (not in the fingerprint)" in text
    assert "OMP_NUM_THREADS" in text   # the doc line under [run] threads


def test_spectrum_reads_train_when_its_eta_comes_from_the_train_lr(tmp_path):
    """With [spectrum] eta = 0 the proxy uses [train] lr, so a spectrum of the pruned model
    depends on the train section too (its fingerprint must change with lr)."""
    from hpcqml.config import upstream
    from hpcqml.stages import reads as declared_reads
    from hpcqml.stages import schemas

    def reads(spectrum: str) -> tuple[str, ...]:
        path = tmp_path / "c.toml"
        path.write_text(f'[run]\noutput = "{tmp_path / "o.h5"}"\nstages = ["spectrum"]\n'
                        f"[train]\nlr = 0.02\n[spectrum]\n{spectrum}\n")
        return upstream("spectrum", load_config(path, schemas(), reads=declared_reads()))

    assert "train" in reads('source = "pruned"')
    assert "train" not in reads('source = "pruned"\neta = 0.05')
    assert "train" in reads('source = "snapshots"')
