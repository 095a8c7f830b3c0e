"""Whole-network fidelity (issue 14): held-out calibration images, bias folding into the
following BatchNorm, the compact-factor sweep and the compression baselines."""

from __future__ import annotations

import pytest
import torch
from test_fidelity_first import Tiny, smooth_images

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
