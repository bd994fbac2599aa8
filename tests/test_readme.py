"""The README's generated parts are current."""

import pathlib
import re

from vafunc.cli.app import main, model_table

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_model_table_is_current():
    text = README.read_text()
    m = re.search(r"<!-- models:start -->\n(.*?)<!-- models:end -->", text, re.S)
    assert m, "README lacks the models:start/models:end markers"
    assert m.group(1).strip() == model_table().strip(), (
        "README model table is stale: run `python tests/update_readme.py` (or paste `vafunc list --markdown`)"
    )


def test_cli_list_and_info(capsys):
    assert main(["list", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "25.56M" in out and "6 models" in out
    assert main(["info", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "11,689,512" in out and "layer4" in out
    assert main(["info", "resnet5O"]) == 2
    assert "did you mean resnet50" in capsys.readouterr().err
