"""What ``hpcqml --help`` and ``hpcqml models`` say: whole first sentences in plain text, and
parameter counts that name the class count they are for.
"""
from __future__ import annotations

import re

from conftest import run_cli
from hpcqml.cli import _first_sentence


def test_first_sentence_keeps_abbreviations_and_drops_markup():
    doc = "Stage ``prune``: global pruning (paper Sec. III B, eq. II.1, Fig. 3).  More text.\n\nDetails."
    assert _first_sentence(doc, "prune") == "Global pruning (paper Sec. III B, eq. II.1, Fig. 3)."
    assert _first_sentence("``qcm`` stage: Carleman matrices\nof ODEs. Rest.", "qcm") == "Carleman matrices of ODEs."
    assert _first_sentence("Keeps 10 % of weights.", "x") == "Keeps 10 %% of weights."  # argparse's % escape


def test_help_shows_whole_plain_sentences():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    commands = res.stdout.split("positional arguments:")[1].split("options:")[0]
    assert "`" not in commands
    # every stage's entry is a finished sentence, not a line cut mid-way
    entries = re.split(r"\n    (?=\w)", commands)
    for entry in entries:
        name, _, text = entry.strip().partition(" ")
        if name in ("pretrain", "prune", "qcm", "hhl", "spectrum", "train"):
            assert " ".join(text.split()).endswith("."), entry


def test_models_names_its_class_count():
    res = run_cli("models", "--classes", "10", "resnet8-w1")
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.splitlines()[:2]
    assert "parameters (10 classes)" in header
    assert row.split()[-1] == "78,042"
