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
