"""The README and the docs pages: generated parts current, the README short, every link alive."""

import pathlib
import re

from vafunc.cli.app import main, model_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODELS_PAGE = ROOT / "docs" / "models.md"
#: the pages a user reads: their relative links must lead somewhere
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 200

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The page without its fenced blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_model_table_is_current():
    text = MODELS_PAGE.read_text()
    m = re.search(r"<!-- models:start -->\n(.*?)<!-- models:end -->", text, re.S)
    assert m, "docs/models.md lacks the models:start/models:end markers"
    assert m.group(1).strip() == model_table().strip(), (
        "the model table in docs/models.md is stale: run `python tests/update_readme.py` "
        "(or paste `vafunc list --markdown`)"
    )


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines, at most {README_MAX_LINES}: move the detail to a page in docs/ "
        "(or figures to benchmarks/README.md) and link it from the README's table"
    )


def test_relative_links_point_to_existing_files():
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where} -> no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{where} -> no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    text = README.read_text()
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in text]
    assert not missing, f"README.md's table does not link {missing}"
    assert "benchmarks/README.md" in text


def test_cli_list_and_info(capsys):
    assert main(["list", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "25.56M" in out and "6 models" in out
    assert main(["info", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "11,689,512" in out and "layer4" in out
    assert main(["info", "resnet5O"]) == 2
    assert "did you mean resnet50" in capsys.readouterr().err
