"""The public names of SPEC §5, called as outside checks call them."""

from __future__ import annotations

import inspect

import torch
import torchvision
from torch import nn

import acl_convert
import acl_convert.pattern
from acl_convert import ACL, kernels


def test_kernel_families():
    gabor = kernels.get("G")
    assert kernels.get("gabor") is gabor
    assert (gabor.code, gabor.name, gabor.num_params) == ("G", "gabor", 4)
    assert gabor.param_names == ("lambda", "theta", "psi", "sigma")
    assert gabor(torch.tensor([[4.0, 0.3, 0.0, 1.5]]), 7, 7).shape == (1, 7, 7)
    names = {kernels.get(c).name for c in ("M", "G", "Lg", "Tf", "Ts", "Lt", "P")}
    assert names == {"mean", "gabor", "log", "tgd1st", "tgd2nd", "lot", "plain"}


def test_patterns_and_compact_factor():
    assert acl_convert.pattern.parse("G30Lg15Lt15Tf36P96")[0] == ("G", 30)
    assert round(acl_convert.pattern.compact_factor("(3x64)G30Lg15Lt15Tf36P96", 7, 7), 4) == 0.4726
    assert round(acl_convert.pattern.compact_factor("G192", 7, 7, gain=False), 4) == 0.9184


def test_fit_kernels_and_its_result():
    res = acl_convert.fit.fit_kernels(
        torch.randn(20, 5, 5), families=["G", "M"], offset=True, device="cpu", seed=0
    )
    assert res.families == ["G", "M"] and res.residuals.shape == (20, 2)
    assert res.params["G"].shape == (20, 4) and res.gain["G"].shape == (20,)
    assert res.offset["M"].shape == (20,)


def test_acl():
    layer = ACL.from_pattern(3, 64, 7, "G30Lg15Lt15Tf36P96", padding=3)
    assert layer.weight.shape == (64, 3, 7, 7)
    assert isinstance(layer.to_conv2d(), nn.Conv2d)
    assert round(layer.compact_factor(), 4) == 0.4726


def test_convert_model_convert_checkpoint_and_load_anann(tmp_path):
    params = inspect.signature(acl_convert.convert_model).parameters
    assert list(params)[:2] == ["model", "layers"] and params["layers"].default == "all"
    assert params["calibration"].kind is inspect.Parameter.KEYWORD_ONLY
    params = inspect.signature(acl_convert.convert_checkpoint).parameters
    assert list(params)[:2] == ["path", "layers"]
    assert params["arch"].default is None and params["calibration"].default is None
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    conversion = acl_convert.convert_model(net, "conv1", threshold=0.9, offset=True)
    assert isinstance(conversion.model.conv1, ACL) and not isinstance(net.conv1, ACL)
    assert 0 <= conversion.compact_factor <= 1
    path = conversion.save(tmp_path / "r.anann.safetensors")
    assert isinstance(acl_convert.load_anann(path).conv1, ACL)  # architecture recorded
    fresh = torchvision.models.resnet18(weights=None)
    assert isinstance(acl_convert.load_anann(path, model=fresh).conv1, ACL)
    torch.save(net.state_dict(), tmp_path / "r.pth")
    again = acl_convert.convert_checkpoint(tmp_path / "r.pth", "conv1", arch=None, threshold=0.9)
    assert again.arch == "resnet18" and again.compact_factor == conversion.compact_factor
