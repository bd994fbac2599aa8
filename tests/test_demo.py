"""`vafunc demo` end to end, in a short setting (the full run is documented in docs/cli.md)."""

import json

import pytest
import torch
import torchvision

import vafunc
from vafunc.cli.demo import DemoConfig, load_digits, run


def test_digits_split_is_real_data():
    x_tr, y_tr, x_te, y_te = load_digits(16)
    assert x_tr.shape == (1438, 3, 16, 16) and x_te.shape == (359, 3, 16, 16)
    assert set(y_tr.tolist()) == set(range(10))
    assert -1.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0


@pytest.mark.parametrize("method", ["auto"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("loop", "vmap")])
def test_demo_short_run_writes_loadable_checkpoints(tmp_path, method):
    """The command line, in its own process (the demo sets the process's allocator thresholds)."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vafunc.cli.app",
            "demo",
            "--members",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--size",
            "16",
            "--out",
            str(out),
            "--ensemble-method",
            method,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("host memory: large freed blocks are kept for reuse" in r.stdout) == bool(vafunc.serving.memory._LIBC)
    result = json.loads((out / "metrics.json").read_text())
    assert len(result["test_member_accuracy"]) == 2
    assert result["test_ensemble_accuracy"] > 0.3  # two short epochs already learn (chance: 0.1)
    assert f"{100 * result['test_ensemble_accuracy']:.2f}%" in r.stdout
    assert (out / "training.png").stat().st_size > 10_000
    # a member's checkpoint is a torchvision state_dict: strict load, same predictions
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = vafunc.load_weights(model, out / "member1.safetensors")
    ref = torchvision.models.resnet18(num_classes=10).eval()
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(out / "member1.safetensors"), strict=True)
    _, _, x_te, _ = load_digits(16)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, state, x_te[:32])[0], ref(x_te[:32]), rtol=1e-5, atol=1e-5)


def test_demo_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        run(DemoConfig(members=0, out=str(tmp_path)))


#: the issue's small ViT: patch 4, 4 layers, width 128 (4 heads, MLP 512), on 16x16 digits
SMALL_VIT = (
    ("image_size", 16),
    ("patch_size", 4),
    ("num_layers", 4),
    ("num_heads", 4),
    ("hidden_dim", 128),
    ("mlp_dim", 512),
)


def test_config_overrides_parse():
    from vafunc.cli.demo import parse_config

    assert parse_config(["patch_size=4,num_layers=4", "dropout=0.1", "representation_size=none"]) == (
        ("patch_size", 4),
        ("num_layers", 4),
        ("dropout", 0.1),
        ("representation_size", None),
    )
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_config(["patch_size"])


@pytest.mark.slow
def test_small_vit_trained_in_bf16_matches_fp32(tmp_path):
    """The precision policy in training: the small ViT on the digits reaches >= 90% test accuracy
    in bf16 compute, within 2 points of the same run in fp32 (README: Transformers)."""
    kw = dict(
        model="vit_b_16",
        members=1,
        epochs=15,
        batch_size=64,
        size=16,
        lr=1e-3,
        weight_decay=0.05,
        optimizer="adamw",
        config=SMALL_VIT,
    )
    fp32 = run(DemoConfig(**kw, out=str(tmp_path / "fp32")))["test_ensemble_accuracy"]
    bf16 = run(DemoConfig(**kw, precision="bf16", out=str(tmp_path / "bf16")))["test_ensemble_accuracy"]
    print(f"small ViT on digits: fp32 {fp32:.1%}, bf16 {bf16:.1%}")
    assert bf16 >= 0.90 and abs(bf16 - fp32) <= 0.02


def test_interpolation_path_ends_at_the_members():
    """``--interpolate``'s path (the demo's interpolation_path) on an untrained 2-member ensemble,
    3 points: its ends are the members themselves, with their stored statistics and recalibrated."""
    from vafunc.cli.demo import interpolation_path

    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = vafunc.ensemble_init(model, 2, 0)
    x_tr, _, x_te, y_te = load_digits(16)
    x_tr, x_te, y_te = x_tr[:64], x_te[:48], y_te[:48]
    rows = interpolation_path(model, params, state, x_tr, x_te, y_te, points=3, calibration=1, batch=64)
    assert rows["t"] == [0.0, 0.5, 1.0]
    for j, (p, s) in zip((0, 2), zip(vafunc.unstack(params), vafunc.unstack(state))):
        for suffix, st in (("", s), ("_recalibrated", vafunc.recalibrate_batch_norm(model, p, s, [x_tr]))):
            with torch.no_grad():
                logits = model.apply(p, st, x_te)[0]
            assert rows["loss" + suffix][j] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y_te)))
            assert rows["accuracy" + suffix][j] == pytest.approx(float((logits.argmax(-1) == y_te).float().mean()))
    with pytest.raises(ValueError, match="two members"):
        run(DemoConfig(members=1, interpolate=True))


@pytest.mark.slow
def test_demo_interpolate_writes_the_plot(tmp_path):
    out = tmp_path / "demo"
    result = run(DemoConfig(members=2, epochs=2, out=str(out), interpolate=True))
    rows = result["interpolation"]
    assert len(rows["t"]) == 21 and (out / "interpolation.png").stat().st_size > 10_000
    # the known result: mid-path, recalibrated statistics do better than interpolated ones
    assert rows["accuracy_recalibrated"][10] > rows["accuracy"][10]


@pytest.mark.slow
def test_demo_spectrum_writes_the_plot(tmp_path):
    """``--spectrum`` after a 1-epoch, 1-member run: the plot, a top eigenvalue no Ritz value of the
    density exceeds (Ritz values of a symmetric matrix lie within its spectrum; the top is within
    1e-2 relative) and a smoothed density that integrates to 1."""
    out = tmp_path / "demo"
    result = run(DemoConfig(members=1, epochs=1, out=str(out), spectrum=True))
    spec = result["spectrum"]
    assert (out / "spectrum.png").stat().st_size > 10_000
    top, nodes = spec["top"], torch.tensor(spec["nodes"])
    assert top > 0 and float(nodes.max()) <= top * (1 + 1e-2) + 1e-6
    grid, dens = torch.tensor(spec["grid"]), torch.tensor(spec["density"])
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-2)
