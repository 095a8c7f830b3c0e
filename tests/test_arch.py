"""Tests of architecture building and detection against torchvision's models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from acl_convert.errors import UsageError
from acl_convert.io import arch
from acl_convert.io.arch import build_model, check_fits, detect_arch, list_archs
from acl_convert.io.checkpoint import load_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weights"


def real(name: str) -> Path:
    path = WEIGHTS / name
    if not path.is_file():
        pytest.skip(f"real checkpoint {name} not found in {WEIGHTS} (shared data absent)")
    return path


def test_list_archs():
    names = list_archs()
    assert {"resnet18", "squeezenet1_0", "mobilenet_v2", "regnet_x_400mf"} <= set(names)
    assert not [n for n in names if "quantized" in n]
    assert names == sorted(names)
    names.append("mine")  # a copy: callers cannot corrupt the registry
    assert "mine" not in list_archs()


def test_build_model_random_weights_on_cpu():
    model = build_model("resnet18")
    assert isinstance(model, nn.Module)
    assert model.conv1.weight.device.type == "cpu"
    assert model.fc.out_features == 1000


def test_build_model_forgives_case_and_dashes():
    assert isinstance(build_model("SqueezeNet1-0", device="meta"), nn.Module)


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf", "googlenet"])
def test_build_on_meta(name):
    # RegNet cannot be built under torch.device("meta") and takes the fallback path.
    model = build_model(name, device="meta")
    devices = {t.device.type for t in model.state_dict().values()}
    assert devices == {"meta"}
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter", "patch undone"


def test_unknown_arch_names_closest():
    with pytest.raises(UsageError) as info:
        build_model("resnet19")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown architecture 'resnet19'" in message and "resnet18" in message
    assert "give a torchvision name" in message and "--" not in message  # no CLI flags


def test_detect_resnet18_with_random_weights():
    assert detect_arch(build_model("resnet18").state_dict()) == "resnet18"


def test_detect_ignores_num_batches_tracked():
    state = {
        k: v
        for k, v in build_model("resnet18", device="meta").state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert detect_arch(state) == "resnet18"


def test_detect_rejects_near_misses():
    state = build_model("resnet18", device="meta").state_dict()
    missing = dict(state)
    del missing["fc.bias"]
    assert detect_arch(missing) is None
    ten_classes = {**state, "fc.weight": torch.empty(10, 512), "fc.bias": torch.empty(10)}
    assert detect_arch(ten_classes) is None


def test_detect_random_dict_is_none_and_fast():
    start = time.perf_counter()
    assert detect_arch({"a.weight": torch.randn(4, 3, 3, 3), "b": torch.ones(2)}) is None
    assert detect_arch({}) is None
    # No torchvision model has this parameter count, so nothing needs to be built.
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "file, expected",
    [
        ("squeezenet1_0_deepcompression_tvnorm.pth", "squeezenet1_0"),
        ("mobilenet_v2_qnnpack_dequant_bnfolded.pth", "mobilenet_v2"),
    ],
)
def test_detect_real_checkpoints(file, expected):
    state = load_checkpoint(real(file)).state_dict
    assert detect_arch(state) == expected
    check_fits(build_model(expected, device="meta"), state, expected)


def test_check_fits_names_the_problem():
    model = build_model("resnet18", device="meta")
    state = dict(model.state_dict())
    check_fits(model, state, "resnet18")
    with pytest.raises(UsageError, match="has shape"):
        check_fits(model, {**state, "conv1.weight": torch.empty(64, 3, 3, 3)}, "resnet18")
    with pytest.raises(UsageError, match="'fc.bias'.*missing"):
        check_fits(model, {k: v for k, v in state.items() if k != "fc.bias"}, "resnet18")
    with pytest.raises(UsageError, match="unexpected"):
        check_fits(model, {**state, "extra.weight": torch.empty(1)}, "resnet18")


@pytest.mark.slow
def test_every_arch_is_detected_as_itself():
    """The parameter-count filter must never rule out the right model, and no two torchvision
    models may share a signature (builds all ~80 models on meta once: ~10 s)."""
    start = time.perf_counter()
    found = {}
    for name in list_archs():
        # The signature cache is what detection fills too, so each model is built only once.
        signature = arch._arch_signature(name)
        found[name] = detect_arch({k: torch.empty(shape, device="meta") for k, shape in signature})
    elapsed = time.perf_counter() - start
    assert {n: f for n, f in found.items() if n != f} == {}
    print(f"built and detected {len(found)} architectures in {elapsed:.1f} s")
    # Cached per process: detecting again costs only the signature.
    start = time.perf_counter()
    assert detect_arch(arch.build_model("resnet50", device="meta").state_dict()) == "resnet50"
    assert time.perf_counter() - start < 1.0
