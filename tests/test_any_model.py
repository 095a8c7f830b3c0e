"""Any PyTorch CNN, from the command line and from Python: a user's own network given as
``file.py:Factory``, a timm model, and a Lightning-style wrapped checkpoint. Each is converted
with calibration, evaluated, fine-tuned, saved, loaded back and baked; the baked state dict
loads strictly into a fresh instance of the same model and computes what the AnaNN computes."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import acl_convert
from acl_convert.io.checkpoint import load_checkpoint
from acl_convert.nn.acl import ACL
from acl_convert.train.evaluate import evaluate
from acl_convert.train.finetune import FinetuneConfig, finetune

USER_NET = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Net(nn.Module):
        """A 7x7 stem, BatchNorm, a depthwise 3x3, a pointwise 1x1 and a linear head."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.pw = nn.Conv2d(8, 16, 1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.stem(x)))
            x = torch.relu(self.bn2(self.dw(x)))
            x = torch.relu(self.pw(x))
            return self.head(x.mean((2, 3)))


    def build():
        return Net()
    '''
)


def images(folder: Path, n: int = 8, size: int = 48) -> Path:
    """``n`` smooth random RGB images and a labels.csv (classes 0..9)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        low = torch.rand(3, 6, 6, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bilinear")[0]
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.png")
        rows.append((f"{i}.png", i % 10))
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "index"])
        writer.writerows(rows)
    return folder


@pytest.fixture
def user_net(tmp_path):
    """(factory spec, module of the user's code, checkpoint path)."""
    import importlib.util

    code = tmp_path / "mynet.py"
    code.write_text(USER_NET)
    spec = importlib.util.spec_from_file_location("mynet_for_test", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    net = module.build()
    with torch.no_grad():  # running statistics as a trained network has them
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "mynet.pth"
    torch.save(net.state_dict(), ckpt)
    return f"{code}:build", module, ckpt


def assert_bakes_into(fresh: nn.Module, anann: Path, baked: Path, model: nn.Module) -> None:
    """The baked state dict loads strictly into ``fresh`` and computes what ``model`` (the
    AnaNN loaded back) computes."""
    state = load_checkpoint(baked).state_dict
    fresh.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def run_cli(invoke, *args):
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    return result


def finetune_cli(invoke, anann, images, teacher, out, *options):
    """``acl-convert finetune ANANN --data IMAGES --teacher TEACHER -o OUT -q [options]``."""
    run_cli(invoke, "finetune", anann, "--data", images, "--teacher", teacher, *options, "-o",
            out, "-q")  # fmt: skip


# --- (a) the user's own network, file.py:Factory --------------------------------------------


def test_user_network_through_the_cli(invoke, tmp_path, user_net):
    spec, module, ckpt = user_net
    imgs = images(tmp_path / "imgs")
    ana, baked = tmp_path / "n.anann.safetensors", tmp_path / "n.baked.pth"
    result = run_cli(
        invoke,
        ckpt,
        "--arch",
        spec,
        "-l",
        "all",
        "--calibration",
        imgs,
        "-t",
        "1",
        "-o",
        ana,
        "--report",
        tmp_path / "n.json",
    )
    assert "skipped 1 of 3" in result.stderr  # the 1x1 conv
    header = acl_convert.io.anann.read_anann(ana).header
    assert header.arch == spec and set(header.layers) == {"stem", "dw"}
    report = json.loads((tmp_path / "n.json").read_text())
    assert report["fidelity"]["images"] > 0
    # The AnaNN names user code: evaluate and finetune need it named again or trusted.
    refused = invoke("evaluate", ana, "--data", imgs, "-q")
    assert refused.exit_code == 2 and "--trust-code" in refused.stderr
    ev = run_cli(
        invoke,
        "evaluate",
        ana,
        "--data",
        imgs,
        "--trust-code",
        "--json",
        "-q",
        "--compare",
        ckpt,
        "--arch",
        spec,
    )
    doc = json.loads(ev.stdout)
    assert doc["images"] == 8 and 0 <= doc["agreement"] <= 1
    ft = tmp_path / "ft.anann.safetensors"
    finetune_cli(invoke, ana, imgs, ckpt, ft, "--trust-code", "--batch-size", "4")
    run_cli(invoke, "bake", ft, "-o", baked, "-q")
    model = acl_convert.load_anann(ft, trust_code=True)
    assert isinstance(model.stem, ACL) and model.dw.groups == 8
    assert_bakes_into(module.build(), ft, baked, model)


def test_user_network_from_python(tmp_path, user_net):
    spec, module, ckpt = user_net
    net = module.build()
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.rand(12, 3, 40, 40), torch.arange(12) % 10),
        batch_size=4,
    )
    conv = acl_convert.convert_model(net, "all", calibration=loader, threshold=1.0, arch=spec)
    # The input model is left untouched; the conversion holds the converted network.
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(isinstance(m, ACL) for m in net.modules())
    assert isinstance(conv.model.stem, ACL) and isinstance(conv.model.dw, ACL)
    assert 0 < conv.compact_factor < 1 and conv.fidelity["images"] > 0
    ana = conv.save(tmp_path / "n.anann.safetensors")
    loaded = acl_convert.load_anann(ana, model=module.build())
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), conv.model(x), rtol=1e-5, atol=1e-6)
    batches = [(x, torch.tensor([1, 2]))]
    assert evaluate(loaded, batches, reference=net)["images"] == 2
    config = FinetuneConfig(objective="logits", epochs=1, batch_size=2)
    losses = finetune(
        loaded,
        [0, 1],
        lambda items: (x[list(items)], None),
        config,
        output=tmp_path / "ft.anann.safetensors",
        header=acl_convert.io.anann.read_anann(ana).header,
        teacher=net,
    )
    assert len(losses) == 1
    from acl_convert.io.anann import bake_state_dict, read_anann
    from acl_convert.io.checkpoint import save_state_dict

    baked = save_state_dict(tmp_path / "b.safetensors", bake_state_dict(read_anann(ana)))
    assert_bakes_into(module.build(), ana, baked, acl_convert.load_anann(ana, model=module.build()))


# --- (b) a timm model ----------------------------------------------------------------------


@pytest.mark.slow
def test_timm_model_through_the_cli_and_python(invoke, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False).eval()
    ckpt = tmp_path / "r18.pth"
    torch.save(net.state_dict(), ckpt)
    imgs = images(tmp_path / "imgs", n=4)
    ana, baked = tmp_path / "r.anann.safetensors", tmp_path / "r.baked.safetensors"
    run_cli(
        invoke,
        ckpt,
        "--arch",
        "timm:resnet18",
        "-l",
        "conv1",
        "-l",
        "layer1.0.conv1",
        "--calibration",
        imgs,
        "-t",
        "1",
        "-o",
        ana,
        "-q",
    )
    header = acl_convert.io.anann.read_anann(ana).header
    assert header.arch == "timm:resnet18"
    # Recorded and not user code: later commands find the architecture without being told.
    ev = run_cli(invoke, "evaluate", ana, "--data", imgs, "--json", "-q", "--compare", ckpt)
    assert json.loads(ev.stdout)["arch"] == "timm:resnet18"
    finetune_cli(invoke, ana, imgs, ckpt, tmp_path / "ft.anann.safetensors", "--batch-size", "2")
    run_cli(invoke, "bake", ana, "-o", baked, "-q")
    model = acl_convert.load_anann(ana)
    assert_bakes_into(timm.create_model("resnet18", pretrained=False), ana, baked, model)
    conv = acl_convert.convert_checkpoint(ckpt, "conv1", arch="timm:resnet18", threshold=1.0)
    assert conv.arch == "timm:resnet18" and isinstance(conv.model.conv1, ACL)


@pytest.mark.slow
def test_timm_layout_is_detected_when_unambiguous(tmp_path):
    """A timm model whose layout no torchvision model has is recognised from its keys."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("mobilenetv3_small_050", pretrained=False)
    ckpt = tmp_path / "m.pth"
    torch.save(net.state_dict(), ckpt)
    conv = acl_convert.convert_checkpoint(ckpt, "conv_stem", threshold=1.0)
    assert conv.arch == "timm:mobilenetv3_small_050"
    assert "architecture detected: timm:mobilenetv3_small_050" in conv.notes


# --- (c) a Lightning-style checkpoint --------------------------------------------------------


def test_lightning_checkpoint_is_unwrapped_and_says_so(invoke, tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(weights=None).eval()
    wrapped = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    }
    ckpt = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(wrapped, ckpt)
    imgs = images(tmp_path / "imgs", n=4)
    ana, baked = tmp_path / "l.anann.safetensors", tmp_path / "l.baked.pth"
    result = run_cli(invoke, ckpt, "-l", "features.0", "--calibration", imgs, "-t", "1", "-o", ana)
    assert "took the state dict under 'state_dict'" in result.stderr
    assert "stripped the key prefix 'model.'" in result.stderr
    assert "left out 5 other entries" in result.stderr
    assert "architecture detected: squeezenet1_1" in result.stderr
    run_cli(invoke, "evaluate", ana, "--data", imgs, "-q", "--compare", ckpt)
    finetune_cli(invoke, ana, imgs, ckpt, tmp_path / "ft.anann.safetensors", "--batch-size", "2")
    run_cli(invoke, "bake", ana, "-o", baked, "-q")
    assert_bakes_into(
        torchvision.models.squeezenet1_1(weights=None), ana, baked, acl_convert.load_anann(ana)
    )
    conv = acl_convert.convert_checkpoint(ckpt, "features.0", threshold=1.0)
    assert any("stripped the key prefix 'model.'" in n for n in conv.notes)
