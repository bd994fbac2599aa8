"""The benchmark report runs end to end and writes its three outputs (nothing here is timed)."""

from __future__ import annotations

import csv

import pytest

from benchmarks import report
from vafunc import cli


@pytest.mark.slow
def test_report_end_to_end(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nSTALE\n<!-- bench:end -->\ntail\n")
    rc = report.main(
        [
            "--models",
            "resnet18",
            "--batch",
            "2",
            "--size",
            "64",
            "--reps",
            "1",
            "--min-seconds",
            "0",
            "--no-research",
            "--no-bf16",
            "--quick-peak",
            "--out",
            str(tmp_path),
            "--readme",
            str(readme),
        ]
    )
    assert rc == 0
    md = (tmp_path / "report.md").read_text()
    assert "| resnet18 | 2 @ 64 |" in md and "Goals" in md and "matmul peak" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = list(csv.DictReader(open(tmp_path / "report.csv")))
    for key in ("ref eager img/s", "vafunc eager img/s", "vafunc compiled img/s", "ref compiled img/s"):
        assert float(row[key]) > 0
    assert 0.9 <= float(row["top-1 agreement fp32"]) <= 1.0  # compiled fp32 is the eager network
    assert float(row["peak_fp32"]) > 0 and float(row["gflop_per_image"]) > 0
    text = readme.read_text()
    assert "STALE" not in text and "| resnet18 | 2 @ 64 |" in text and text.endswith("<!-- bench:end -->\ntail\n")
    # re-rendering from the CSV gives the same markdown
    assert report.render(str(tmp_path)) == 0
    assert (tmp_path / "report.md").read_text() == md


def test_the_cli_has_no_bench_command(capsys):
    """The benchmarks run from a checkout (``python -m benchmarks report``), not from the installed
    ``vafunc`` command."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "predict" in out and "bench" not in out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 2


def test_benchmarks_help_lists_every_subcommand(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert all(c in usage for c in ("report", "compat", "profile", "psg")), usage


def test_report_rejects_unknown_models():
    with pytest.raises(ValueError, match="resnet18"):
        report.main(["--models", "resnet81", "--no-research"])
