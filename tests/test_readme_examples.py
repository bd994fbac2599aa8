"""Every ```python block of the README, of each page in docs/ and of benchmarks/README.md runs on its
own, as a newcomer pastes it (the default suite: the README's blocks and the first of each page;
``-m slow``: all).

Each block runs in a fresh interpreter (``sys.executable``) in an empty working directory, with
``TORCH_HOME`` pointing into that temporary tree and ``VAFUNC_OFFLINE=1``, so nothing can come from
the user's cache or the network. A block may be marked by an HTML comment on the line before its
fence, ``<!-- readme-test: MARKER [MARKER ...] -->``:

* ``network``: it needs files a user would download or have at hand. The test prepares them: for
  each ``vafunc.hub.pretrained("name"[, "TAG"])`` in the block, a checkpoint saved from a randomly
  initialised torchvision model under the file name the hub expects in
  ``$TORCH_HOME/hub/checkpoints/`` (the hub trusts a file already in the cache and re-checks its
  SHA-256 only with ``load_weights(..., check_hash=True)``, so this stand-in loads; what it checks is
  the block's code path, not the published weights); for each timm tag (``"seresnet50.a1_in1k"``) it
  names, timm's randomly initialised model in the tag's repository of a Hugging Face cache under the
  block's ``HF_HOME`` (every block runs with its own empty ``HF_HOME`` and ``HF_HUB_OFFLINE=1``); and
  for each ``"name.jpg"``/``"name.png"`` it names, one of scikit-image's photographs in the working
  directory.
* ``torchrun``: a complete script, written to ``train.py`` and launched as the page says,
  ``torchrun --standalone --nproc_per_node 2 train.py`` (gloo on CPU).
* ``demo``: it reads what ``vafunc demo`` writes. The test prepares ``vafunc-demo/member{i}.safetensors``
  (the demo's default 4 members of resnet18 with 10 classes) from random initialisations, saved as the
  demo saves them, so the block's code path is checked without a minute of training.
* ``slow``: takes more than ~20 s (``torch.compile``); runs under ``pytest -m slow``.
* ``fragment``: an excerpt that does not run on its own (a family file's pieces in
  ``docs/adding-a-family.md``); skipped with that reason. Use it sparingly.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the pages whose blocks run: the README, every docs page, the benchmarks page
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MARKERS = {"network", "torchrun", "slow", "demo", "fragment"}
TORCHRUN = ["--standalone", "--nproc_per_node", "2", "train.py"]
TIMEOUT_S = {"plain": 240, "torchrun": 300, "slow": 600}

# a marker comment (optional) directly above a ```python fence, the code, the closing fence
_BLOCK = re.compile(
    r"^(?:<!--\s*readme-test:\s*(?P<markers>[^>]*?)\s*-->\n)?```python\n(?P<code>.*?)^```[ \t]*$", re.M | re.S
)
# anything that opens a Python-ish fenced block, to catch one the parser above would miss
_ANY_PY_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*(python3?|py|pycon|ipython)\b", re.M | re.I)
_MARKER_COMMENT = re.compile(r"<!--\s*readme-test\b", re.I)
_PRETRAINED = re.compile(r"""hub\.pretrained\(\s*["'](\w+)["'](?:\s*,\s*["'](\w+)["'])?""")
# timm's "name.tag", given to vafunc.hub.pretrained directly or through a variable named tag
_TIMM_TAG = re.compile(r"""["'](\w+\.\w+)["']""")
_IMAGE = re.compile(r"""["']([\w.-]+\.(?:jpe?g|png))["']""", re.I)


def _headings(text: str) -> list[tuple[int, str]]:
    """(offset, title) of the markdown headings outside fenced blocks."""
    out, pos, fenced = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#+\s+(.*)", line)):
            out.append((pos, m.group(1)))
        pos += len(line)
    return out


def _page_id(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).with_suffix("").as_posix()


def _blocks(text: str, page: pathlib.Path = ROOT / "README.md") -> list[dict]:
    out, per_heading = [], {}
    headings = _headings(text)
    for m in _BLOCK.finditer(text):
        heading = next((h for pos, h in reversed(headings) if pos < m.start()), "top")
        slug = "-".join(re.findall(r"[a-z0-9]+", heading.lower())[:3])
        per_heading[slug] = per_heading.get(slug, 0) + 1
        markers = set((m.group("markers") or "").replace(",", " ").split())
        out.append(
            {
                "page": page.relative_to(ROOT).as_posix(),
                "id": f"{_page_id(page)}:{slug}-{per_heading[slug]}",
                "line": text.count("\n", 0, m.start()) + 1 + (1 if m.group("markers") is not None else 0),
                "markers": markers,
                "code": m.group("code"),
            }
        )
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page.read_text(), page)]


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_python_block_is_collected(page):
    text = page.read_text()
    blocks = [b for b in BLOCKS if b["page"] == page.relative_to(ROOT).as_posix()]
    if page.name == "README.md" and page.parent == ROOT:
        assert blocks, "no ```python blocks found in README.md"
    fences = _ANY_PY_FENCE.findall(text)
    assert len(fences) == len(blocks), (
        f"{page.name} opens {len(fences)} Python code blocks but {len(blocks)} were collected: write each "
        "as a fence of exactly ```python at the start of a line, closed by ``` on its own line"
    )
    marked = sum(1 for b in blocks if b["markers"])
    comments = len(_MARKER_COMMENT.findall(text))
    assert comments == marked, (
        f"{page.name}: {comments} readme-test comments but {marked} marked blocks: a marker must be the line "
        "directly above its ```python fence"
    )
    for b in blocks:
        where = f"{b['page']} line {b['line']}"
        unknown = b["markers"] - MARKERS
        assert not unknown, f"{where}: unknown readme-test marker(s) {sorted(unknown)}"
        if "init_process_group" in b["code"]:
            assert "torchrun" in b["markers"], f"{where}: a torch.distributed block must be marked torchrun"
        if "torchrun" in b["markers"]:
            assert "destroy_process_group" in b["code"], f"{where}: a torchrun script must end its process group"
    if any("torchrun" in b["markers"] for b in blocks):
        assert "torchrun " + " ".join(TORCHRUN) in text, f"{page.name}'s torchrun command is not the one this test runs"


def _stand_in_checkpoints(code: str, torch_home: pathlib.Path) -> None:
    """Random-weight torchvision checkpoints under the names the hub resolves the block's tags to."""
    import torch
    import torchvision

    import vafunc

    for name, tag in _PRETRAINED.findall(code):
        w = vafunc.hub.get_weights(name, tag or "DEFAULT")
        if w.source != "torchvision":
            pytest.fail(f"no local stand-in for {w.source} checkpoint {w.name}; use a torchvision model in the docs")
        dst = torch_home / "hub" / "checkpoints" / w.file
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(w.model, weights=None, **dict(w.config)).state_dict(), dst)


def _stand_in_hub_cache(code: str, hf_home: pathlib.Path) -> None:
    """For each timm tag the block names, timm's randomly initialised model saved as timm publishes
    it, in the tag's repository of a Hugging Face cache under ``hf_home`` (tests/hf_cache.py)."""
    import timm
    import torch
    from hf_cache import put_timm_model

    from vafunc.io.hub import timm_hub

    for spec in _TIMM_TAG.findall(code):
        if not timm_hub.is_timm_tag(spec):
            continue
        t = timm_hub.get_timm_tag(spec)
        torch.manual_seed(0)
        put_timm_model(hf_home / "hub", t.repo_id, timm.create_model(t.name, pretrained=False).eval())


def _photos(code: str, cwd: pathlib.Path) -> None:
    """scikit-image's photographs under the file names the block opens."""
    from PIL import Image
    from skimage import data

    source = {"cat": data.chelsea, "chelsea": data.chelsea, "coffee": data.coffee}
    for fname in _IMAGE.findall(code):
        stem = pathlib.Path(fname).stem.lower()
        Image.fromarray(source.get(stem, data.astronaut)()).save(cwd / fname)


def _demo_checkpoints(cwd: pathlib.Path, members: int = 4) -> None:
    """``vafunc-demo/member{i}.safetensors`` as ``vafunc demo`` (defaults: 4 x resnet18) saves them."""
    import vafunc

    model = vafunc.get_model("resnet18", num_classes=10)
    (cwd / "vafunc-demo").mkdir(exist_ok=True)
    for i in range(members):
        params, state = model.init(i)
        vafunc.save_weights(
            params,
            state,
            cwd / "vafunc-demo" / f"member{i}.safetensors",
            metadata={"model": "resnet18", "num_classes": "10"},
        )


def _tail(s: str, n: int = 6000) -> str:
    return s if len(s) <= n else "...\n" + s[-n:]


def _default_blocks() -> set[str]:
    """The blocks the default suite runs: every block of the README and the first runnable block of each
    page (each costs a fresh interpreter, ~5 s); the others run under ``-m slow`` (the 10-minute budget)."""
    ids, seen = set(), set()
    for b in BLOCKS:
        if b["markers"] & {"slow", "fragment"}:
            continue
        if b["page"] == "README.md" or b["page"] not in seen:
            ids.add(b["id"])
            seen.add(b["page"])
    return ids


_DEFAULT_BLOCKS = _default_blocks()


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b, id=b["id"], marks=[pytest.mark.slow] if "slow" in b["markers"] or b["id"] not in _DEFAULT_BLOCKS else []
        )
        for b in BLOCKS
    ],
)
def test_readme_block_runs(block, tmp_path):
    if "fragment" in block["markers"]:
        pytest.skip("a fragment: it does not run on its own")
    cwd = tmp_path / "work"
    cwd.mkdir()
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    env = {**os.environ, "TORCH_HOME": str(torch_home), "VAFUNC_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")  # the Hugging Face cache, too
    env.pop("HF_HUB_CACHE", None)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env.setdefault("OMP_NUM_THREADS", "1")  # as conftest: one thread per xdist worker
    code, markers = block["code"], block["markers"]
    if "network" in markers:
        _stand_in_checkpoints(code, torch_home)
        _stand_in_hub_cache(code, tmp_path / "hf_home")
        _photos(code, cwd)
    if "demo" in block["markers"]:
        _demo_checkpoints(cwd)
    if "torchrun" in markers:
        (cwd / "train.py").write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN]  # == `torchrun ...` in this venv
        timeout = TIMEOUT_S["torchrun"]
    else:
        (cwd / "block.py").write_text(code)
        cmd = [sys.executable, "block.py"]
        timeout = TIMEOUT_S["slow" if "slow" in markers else "plain"]
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        pytest.fail(f"{block['page']} line {block['line']} ({block['id']}) ran over {timeout} s\n{_tail(out)}")
    assert r.returncode == 0, (
        f"{block['page']} line {block['line']} ({block['id']}, markers {sorted(markers) or 'none'}) exited with "
        f"{r.returncode}\n--- code ---\n{code}--- stdout ---\n{_tail(r.stdout, 2000)}\n"
        f"--- stderr ---\n{_tail(r.stderr)}"
    )
