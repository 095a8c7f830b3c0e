"""Whole-network fidelity (issue 14): held-out calibration images, bias folding into the
following BatchNorm, the compact-factor sweep and the compression baselines."""

from __future__ import annotations

import pytest
import torch
from test_fidelity_first import Tiny, smooth_images
from torch import nn

from acl_convert.calibration.fidelity import measure_fidelity
from acl_convert.calibration.holdout import default_holdout, held_positions, split_holdout
from acl_convert.errors import UsageError
from acl_convert.pipeline import convert_model

torch.set_default_dtype(torch.float32)


# --- held-out calibration images -----------------------------------------------------------------


def test_holdout_split_is_disjoint_complete_and_spread():
    x = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 2, 2)
    fit, held = split_holdout([x[:4], x[4:]], 3)
    fit_ids = torch.cat(fit)[:, 0, 0, 0].tolist()
    held_ids = torch.cat(held)[:, 0, 0, 0].tolist()
    assert sorted(fit_ids + held_ids) == list(range(10))
    assert held_ids == [1, 5, 8] == held_positions(10, 3)
    assert max(len(b) for b in fit + held) <= 6
    assert [default_holdout(n) for n in (1, 7, 8, 256, 1000)] == [0, 1, 2, 64, 64]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(10)
    return Tiny().eval(), smooth_images(16, 3, 20, seed=11)


def test_held_out_fidelity_uses_no_calibration_image(tiny):
    """With 4 of 16 images held out, the conversion is the one fitted to the other 12 alone
    (nothing of the held-out 4 reaches the fit), and its fidelity is that of the 4 alone."""
    model, x = tiny
    held = held_positions(16, 4)
    rest = [i for i in range(16) if i not in held]
    conv = convert_model(model, ["conv1", "conv2"], calibration=[x], holdout=4, threshold=0.5)
    alone = convert_model(
        model, ["conv1", "conv2"], calibration=[x[rest]], holdout=0, threshold=0.5
    )
    assert conv.settings.calibration_images == 12 and conv.settings.holdout_images == 4
    for a, b in zip(conv.layers, alone.layers, strict=True):
        assert torch.equal(a.acl.synthesize(), b.acl.synthesize())
    assert conv.fidelity["on"] == "holdout" and conv.fidelity["images"] == 4
    on_held = measure_fidelity(model, conv.model, [x[held]], ["conv1", "conv2"])
    assert conv.fidelity["logits_rel_error"] == pytest.approx(on_held["logits_rel_error"])
    assert alone.fidelity["on"] == "calibration" and alone.fidelity["images"] == 12


def test_holdout_must_leave_images_to_fit(tiny):
    model, x = tiny
    with pytest.raises(UsageError, match="holdout"):
        convert_model(model, ["conv1"], calibration=[x[:4]], holdout=4)
    with pytest.raises(UsageError, match="holdout"):
        convert_model(model, ["conv1"], calibration=[x[:4]], holdout=-1)


# --- bias folding into the following BatchNorm ---------------------------------------------------


class ConvBN(nn.Module):
    """Bias-less convs each followed by a BatchNorm (as MobileNetV2), and one conv whose output
    also feeds a skip connection (its bias cannot be folded)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        return self.head((x + y).mean((2, 3)))


@pytest.fixture(scope="module")
def conv_bn():
    torch.manual_seed(3)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval(), smooth_images(12, 3, 16, seed=4)


def test_following_batchnorms_finds_only_sole_consumers(conv_bn):
    from acl_convert.network.batchnorm import following_batchnorms

    model, _ = conv_bn
    found = following_batchnorms(model, ["conv1", "conv2", "conv3"])
    assert found == {"conv1": "bn1", "conv2": "bn2"}


def test_folded_bias_bakes_to_the_same_network(conv_bn, tmp_path):
    """The solved biases live in the BatchNorms' running means only: the ACLs have no bias, the
    AnaNN loaded back and the baked plain network compute what the converted model computes,
    and the first layer's output error is no higher than without the fold."""
    from acl_convert.io.anann import bake_state_dict, load_anann, read_anann

    model, x = conv_bn
    mean_before = model.bn1.running_mean.clone()
    layers = ["conv1", "conv2", "conv3"]
    conv = convert_model(model, layers, calibration=[x], holdout=0, target_compact=0.5)
    plain = convert_model(
        model, layers, calibration=[x], holdout=0, target_compact=0.5, fold_bias=False
    )
    folds = {r.layer.name: r.fold for r in conv.layers}
    assert folds["conv1"][0] == "bn1" and folds["conv2"][0] == "bn2" and folds["conv3"] is None
    assert all(r.acl.bias is None for r in conv.layers)
    assert float(folds["conv1"][1].abs().max()) > 0
    first, first_plain = conv.layers[0].joint, plain.layers[0].joint
    assert first.relative_error() <= first_plain.relative_error() + 1e-9

    path = conv.save(tmp_path / "m.anann.safetensors")
    loaded = load_anann(path, model=ConvBN().eval()).eval()
    baked = ConvBN().eval()
    baked.load_state_dict(bake_state_dict(read_anann(path)))
    mean = model.bn1.running_mean - folds["conv1"][1]
    assert torch.allclose(conv.model.bn1.running_mean, mean)
    with torch.no_grad():
        want = conv.model(x)
        assert torch.allclose(loaded(x), want, atol=1e-5)
        assert torch.allclose(baked(x), want, atol=1e-5)
    assert torch.equal(model.bn1.running_mean, mean_before)  # the input model is untouched


# --- layer-wise reconstruction -------------------------------------------------------------------


def test_reconstruction_never_raises_the_exact_output_error(conv_bn):
    """Gradient steps on the layer's exact output error keep the best state seen (the start
    included), so the re-solved error after them is never above the re-solve's alone."""
    model, x = conv_bn
    kw = dict(calibration=[x], holdout=0, target_compact=0.6, sweeps=0)
    base = convert_model(model, ["conv3"], **kw)
    stepped = convert_model(model, ["conv3"], reconstruct=30, **kw)
    assert stepped.layers[0].joint.relative_error() <= base.layers[0].joint.relative_error() + 1e-9
    assert stepped.layers[0].assignment.codes == base.layers[0].assignment.codes


# --- the sweep -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_sweep_points_match_separate_conversions(tiny, scope):
    """Each point of a sweep is the conversion convert_model makes at that budget: the same
    layers to the bit, the same compact factor and the same held-out fidelity (with a
    model-wide budget the fits are made once and reused)."""
    from acl_convert.sweep import sweep_model

    model, x = tiny
    kw = dict(calibration=[x], holdout=4, budget_scope=scope)
    result = sweep_model(model, ["conv1", "conv2"], targets=[0.3, 0.6], keep=True, **kw)
    assert result.reused_fits == (scope == "model")
    assert [p.target for p in result.points] == [0.3, 0.6]
    for point in result.points:
        alone = convert_model(model, ["conv1", "conv2"], target_compact=point.target, **kw)
        assert point.compact_factor == alone.compact_factor >= point.target - 1e-9
        for a, b in zip(point.conversion.layers, alone.layers, strict=True):
            assert torch.equal(a.acl.synthesize(), b.acl.synthesize())
        assert point.fidelity == alone.fidelity
        assert [r["output_error"] for r in point.layers] == [
            alone.fidelity["layer_rel_error"][n] for n in ("conv1", "conv2")
        ]
    cfs = [p.compact_factor for p in result.points]
    assert cfs == sorted(cfs)


def test_sweep_reports_accuracy_on_a_labelled_evaluation_set(tiny):
    from acl_convert.sweep import sweep_model

    model, x = tiny
    labels = torch.arange(16) % 4
    evaluation = [(x[8:], labels[8:])]
    result = sweep_model(
        model, ["conv1"], targets=[0.5], calibration=[x[:8]], holdout=2, evaluation=evaluation
    )
    point = result.points[0]
    assert result.reference["images"] == 8 and point.evaluation["images"] == 8
    assert set(point.evaluation) == {"images", "top1", "top5", "agreement", "logits_rel_error"}
    assert point.fidelity["images"] == 2
    doc = result.to_dict()
    assert doc["points"][0]["target"] == 0.5 and "conversion" not in doc["points"][0]
    best = result.largest(max_top1_loss=1.0, min_agreement=0.0)
    assert best is point
    with pytest.raises(UsageError, match="target_compact"):
        sweep_model(model, ["conv1"], targets=[0.5], calibration=[x], target_compact=0.5)


def test_cli_sweep_writes_table_json_plot_and_page(invoke, tmp_path, squeezenet_ckpt, copy_images):
    import json

    images = copy_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    out.mkdir()
    args = ["sweep", squeezenet_ckpt, "-l", "features.0", "--calibration", images, "-q"]
    paths = {k: out / f"s.{k}" for k in ("json", "png", "html")}
    result = invoke(
        *args,
        "--targets",
        "0.5,0.8",
        "--json",
        paths["json"],
        "--plot",
        paths["png"],
        "--html",
        paths["html"],
    )
    assert result.exit_code == 0, result.stderr
    assert "compact" in result.stdout and "held-out: 2 images" in result.stdout
    doc = json.loads(paths["json"].read_text())
    assert [p["target"] for p in doc["points"]] == [0.5, 0.8] and doc["reused_fits"]
    assert all(p["fidelity"]["on"] == "holdout" for p in doc["points"])
    assert doc["points"][1]["compact_factor"] >= 0.8 - 1e-9
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert "<table" in paths["html"].read_text() and "data:image/png" in paths["html"].read_text()


def test_cli_sweep_refuses_evaluation_images_it_calibrates_on(
    invoke, tmp_path, squeezenet_ckpt, copy_images
):
    from conftest import IMAGES

    images = copy_images(tmp_path / "imgs", 4)
    classes = IMAGES.parent / "imagenet_classes.tsv"
    args = ["sweep", squeezenet_ckpt, "-l", "features.0", "--calibration", images]
    result = invoke(*args, "--data", images, "--classes", classes)
    assert result.exit_code == 2 and "also calibration images" in result.stderr


# --- the baselines of bench/baselines.py ---------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "tucker2", "prune"])
@pytest.mark.parametrize("budget", [37, 200, 539])
def test_each_baseline_meets_its_parameter_count_exactly(method, budget):
    """Every baseline keeps exactly the parameters it is given (a rank counts in steps, the rest
    is a sparse correction), computes a conv with its weight, and removes the mean shift."""
    import sys

    from conftest import REPO

    if method == "tucker2":
        pytest.importorskip("tensorly")
    sys.path.insert(0, str(REPO / "bench"))
    from baselines import build

    from acl_convert.calibration.moments import Calibration

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    x = smooth_images(8, 6, 12, seed=2)
    moments = Calibration([x]).moments(conv, "")
    layer = build(method, conv, budget, moments)
    assert layer.parameter_count() == budget
    with torch.no_grad():
        y, y_hat = conv(x), layer(x)
        ref = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    assert torch.allclose(y_hat, ref, atol=1e-5)
    # The bias correction: no mean shift over the calibration patches (interior and padding).
    assert torch.allclose((y_hat - y).mean((0, 2, 3)), torch.zeros(10), atol=1e-4)


def test_low_rank_baselines_refuse_depthwise_convs():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from baselines import build

    from acl_convert.calibration.moments import Calibration

    conv = nn.Conv2d(4, 4, 3, groups=4)
    moments = Calibration([torch.randn(2, 4, 8, 8)]).moments(conv, "")
    with pytest.raises(ValueError, match="grouped"):
        build("svd", conv, 20, moments)
    assert build("prune", conv, 20, moments).parameter_count() == 20
