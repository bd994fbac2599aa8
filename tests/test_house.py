"""Command-line housekeeping: ``vafunc list``'s stored rows, a closed pipe, help texts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vafunc.cli import app
from vafunc.core import registry


def test_stored_list_rows_are_the_registrys():
    """``vafunc/core/models.json`` (what ``vafunc list`` prints without probing every model) holds
    every registered model with its current facts. After a registry change regenerate it:
    ``python -c 'from vafunc.cli.app import write_model_rows; write_model_rows()'``."""
    stored = registry.stored_rows()
    live = app.model_rows(live=True)
    assert [r["name"] for r in live] == sorted(stored), "models.json is out of date (see the docstring)"
    assert [stored[r["name"]] for r in live] == live, "models.json is out of date (see the docstring)"
    assert app.model_rows() == live


def test_list_into_a_closed_pipe_is_quiet():
    p = subprocess.Popen([sys.executable, "-m", "vafunc.cli", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # `vafunc list | head -1`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("command", ["list", "info", "predict", "convert", "demo"])
def test_every_option_has_help(command):
    sub = next(a for a in app.build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help and a.dest != "help"]
    assert not missing, f"vafunc {command}: options without help: {missing}"
