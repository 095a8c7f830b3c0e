"""The deployment paths users try: an AnaNN (ACLs in place) and its baked twin through
``torch.jit.script``, ``torch.jit.trace``, ``torch.export.export`` and ONNX (run with
onnxruntime), each giving the eager model's outputs; swept over kernel size, stride, padding,
dilation and groups as escnn's export tests do.

Tolerances: every path computes the same convolution with the same (synthesised or baked) float32
weight; only the order of float32 sums may differ between backends, a few ulps of the output's
magnitude, so 1e-5 relative plus 1e-6 absolute on outputs of order 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acl_convert import ACL

CASES = {
    "3x3": dict(kernel_size=3, padding=1),
    "7x7 stride 2": dict(kernel_size=7, stride=2, padding=3),
    "5x3 dilated": dict(kernel_size=(5, 3), dilation=2, padding=2),
    "depthwise": dict(kernel_size=3, padding=1, groups=6),
    "grouped, reflect": dict(kernel_size=3, padding=1, groups=2, padding_mode="reflect"),
}


def network(case: dict, seed: int = 0) -> nn.Module:
    """conv (as an ACL with a random assignment) -> ReLU -> plain conv -> pooled linear head."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(6, 6, **case)
    k = conv.out_channels * conv.in_channels // conv.groups
    families = ["G", "Lg", "Tf", "Ts", "Lt", "M", "P"]
    codes = [families[i] for i in torch.randint(len(families), (k,), generator=g).tolist()]
    acl = ACL(6, 6, **case, assignment=codes, gain=True, offset=True, generator=g)
    return nn.Sequential(acl, nn.ReLU(), nn.Conv2d(6, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def baked(model: nn.Module) -> nn.Module:
    out = nn.Sequential(*model)
    out[0] = model[0].to_conv2d()
    return out


def close(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def models(request):
    model = network(CASES[request.param]).eval()
    x = torch.randn(2, 6, 13, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
        return model, baked(model).eval(), x, reference


@pytest.mark.parametrize("which", ["anann", "baked"])
def test_torchscript(models, which):
    model, plain, x, reference = models
    scripted = torch.jit.script(model if which == "anann" else plain)
    with torch.no_grad():
        close(scripted(x), reference)


@pytest.mark.parametrize("which", ["anann", "baked"])
def test_trace(models, which):
    model, plain, x, reference = models
    with torch.no_grad():
        traced = torch.jit.trace(model if which == "anann" else plain, x)
        close(traced(x), reference)
        # Another input through the traced graph: nothing input-dependent was frozen in.
        y = torch.randn_like(x)
        close(traced(y), (model if which == "anann" else plain)(y))


@pytest.mark.parametrize("which", ["anann", "baked"])
def test_torch_export(models, which):
    model, plain, x, reference = models
    exported = torch.export.export(model if which == "anann" else plain, (x,))
    with torch.no_grad():
        close(exported.module()(x), reference)


@pytest.mark.parametrize("which", ["anann", "baked"])
def test_onnx(models, which, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, plain, x, reference = models
    path = tmp_path / "m.onnx"
    torch.onnx.export(model if which == "anann" else plain, (x,), str(path), dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    close(out, reference)


def test_onnx_dynamo_exporter(tmp_path):
    """torch.onnx's default (torch.export based) exporter on one AnaNN."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = network(CASES["3x3"]).eval()
    x = torch.randn(1, 6, 9, 9)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        close(out, model(x))


def test_scripting_freezes_the_weight_and_leaves_the_model_alone():
    """TorchScript compiles the ACL with its synthesised weight frozen (documented: train
    before scripting); the Python model keeps its ACL and its trainable AKPs."""
    model = network(CASES["3x3"]).eval()
    x = torch.randn(1, 6, 9, 9)
    scripted = torch.jit.script(model)
    assert isinstance(model[0], ACL)
    with torch.no_grad():
        before = scripted(x)
        for p in model[0].akp.values():
            p.add_(0.1)
        close(scripted(x), before)  # frozen
        assert not torch.allclose(model(x), before)  # the Python model moved
