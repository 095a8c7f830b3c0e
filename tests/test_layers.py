"""Tests of convolution listing and ``--layers`` selection."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from acl_convert.errors import UsageError, UserError
from acl_convert.io.arch import build_model
from acl_convert.io.checkpoint import load_checkpoint
from acl_convert.network.convs import (
    ConvLayer,
    conv_layers,
    eligible,
    estimate_fit_seconds,
    select_layers,
)

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weights"


@pytest.fixture(scope="module")
def resnet():
    """resnet18 shapes (meta tensors: no memory) and its model."""
    model = build_model("resnet18", device="meta")
    return model.state_dict(), model


def names(layers):
    return [layer.name for layer in layers]


def select(selectors, state, **kwargs):
    return names(select_layers(selectors, conv_layers(state), state, **kwargs))


def usage_error(selectors, state) -> str:
    with pytest.raises(UsageError) as info:
        select_layers(selectors, conv_layers(state), state)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- listing ---------------------------------------------------------------------------------


def test_conv_layers_without_model(resnet):
    state, _ = resnet
    layers = conv_layers(state)
    assert len(layers) == 20  # stem + 16 block convs + 3 downsample projections
    first = layers[0]
    assert first == ConvLayer("conv1", "conv1.weight", (64, 3, 7, 7))
    assert first.kernel_size == (7, 7) and first.num_kernels == 192
    assert first.groups is None and first.stride is None and first.bias is None
    assert names(layers) == [k[:-7] for k in state if k.endswith(".weight") and state[k].ndim == 4]


def test_conv_layers_with_model_carry_hyperparameters(resnet):
    state, model = resnet
    layers = {layer.name: layer for layer in conv_layers(state, model)}
    conv1 = layers["conv1"]
    assert (
        conv1.groups,
        conv1.in_channels,
        conv1.stride,
        conv1.padding,
        conv1.dilation,
        conv1.padding_mode,
        conv1.bias,
    ) == (1, 3, (2, 2), (3, 3), (1, 1), "zeros", False)
    assert layers["layer2.0.downsample.0"].kernel_size == (1, 1)


def test_depthwise_groups_from_model():
    model = build_model("mobilenet_v2", device="meta")
    layers = {layer.name: layer for layer in conv_layers(model.state_dict(), model)}
    dw = layers["features.1.conv.0.0"]
    assert dw.shape == (32, 1, 3, 3) and dw.groups == 32 and dw.in_channels == 32
    assert dw.num_kernels == 32


def test_model_excludes_4d_weights_of_other_modules():
    state = {"conv.weight": torch.empty(2, 1, 3, 3), "odd.weight": torch.empty(2, 1, 3, 3)}
    model = torch.nn.Module()
    model.conv = torch.nn.Conv2d(1, 2, 3)
    model.odd = torch.nn.Module()
    assert names(conv_layers(state)) == ["conv", "odd"]
    assert names(conv_layers(state, model)) == ["conv"]


def test_eligible():
    assert eligible(ConvLayer("a", "a.weight", (1, 1, 2, 2)))
    assert eligible(ConvLayer("a", "a.weight", (1, 1, 7, 5)))
    assert not eligible(ConvLayer("a", "a.weight", (1, 1, 1, 1)))
    assert not eligible(ConvLayer("a", "a.weight", (1, 1, 1, 7)))


# --- selection -------------------------------------------------------------------------------


def test_exact_names_with_or_without_weight(resnet):
    state, _ = resnet
    assert select(["conv1"], state) == ["conv1"]
    assert select(["layer3.1.conv2.weight"], state) == ["layer3.1.conv2"]


def test_glob_and_all(resnet):
    state, _ = resnet
    assert select(["layer1.*"], state) == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
    ]
    assert select(["*.conv2"], state)[-1] == "layer4.1.conv2"
    assert len(select(["all"], state)) == 17
    assert "layer2.0.downsample.0" not in select(["all"], state)


def test_glob_skipping_1x1_is_noted(resnet, caplog):
    state, _ = resnet
    notes = []
    with caplog.at_level(logging.INFO, logger="acl_convert.network.convs"):
        picked = select(["layer2.0.*"], state, on_note=notes.append)
    assert picked == ["layer2.0.conv1", "layer2.0.conv2"]
    assert len(notes) == 1 and "skipped 1 of 3" in notes[0]
    assert notes[0] in caplog.text
    notes.clear()
    select(["all"], state, on_note=notes.append)
    assert "skipped 3 of 20" in notes[0]


def test_several_selectors_deduplicated_in_state_dict_order(resnet):
    state, _ = resnet
    picked = select(["layer1.1.*", "conv1", "layer1.*.conv2,conv1.weight"], state)
    assert picked == ["conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]


def test_selected_1x1_conv(resnet):
    state, _ = resnet
    message = usage_error(["layer2.0.downsample.0"], state)
    assert message.startswith("layer layer2.0.downsample.0 is a 1x1 convolution")
    assert "nothing to fit" in message and "select another layer" in message


def test_selected_1xn_conv():
    state = {"a.weight": torch.empty(4, 4, 1, 7), "b.weight": torch.empty(4, 4, 3, 3)}
    assert "1x7 convolution" in usage_error(["a"], state)


@pytest.mark.parametrize(
    "name, shape", [("fc", "(1000, 512)"), ("bn1", "(64,)"), ("layer1.0.bn2", "(64,)")]
)
def test_selected_non_conv(resnet, name, shape):
    state, _ = resnet
    message = usage_error([name], state)
    assert message.startswith(f"{name} is not a 2-D convolution (its weight has shape {shape});")


def test_non_conv_message_with_keys_only(resnet):
    state, _ = resnet
    with pytest.raises(UsageError, match="fc is not a 2-D convolution; "):
        select_layers(["fc"], conv_layers(state), list(state))


def test_block_name_suggests_glob(resnet):
    state, _ = resnet
    assert "'layer1.*'" in usage_error(["layer1"], state)


def test_no_match_lists_closest(resnet):
    state, _ = resnet
    message = usage_error(["conv9"], state)
    assert message.startswith("--layers 'conv9' matches no convolution; closest: conv1")
    assert "acl-convert layers CHECKPOINT" in message
    assert "closest: layer1." in usage_error(["layer1.9.*"], state)


def test_glob_matching_only_1x1(resnet):
    state, _ = resnet
    message = usage_error(["*.downsample.*"], state)
    assert "matches only 1x1 convolutions (3)" in message


def test_empty_selection(resnet):
    state, _ = resnet
    assert "needs a layer name" in usage_error([], state)
    assert "needs a layer name" in usage_error([" , "], state)


@pytest.mark.parametrize(
    "selector, state, expected",
    [
        ("all", {"a.weight": torch.empty(4, 4, 1, 1)}, "no convolution with kernels of 2x2"),
        ("x", {"a.weight": torch.empty(4, 4, 1, 1)}, "no convolution with kernels of 2x2"),
        ("x", {"fc.weight": torch.empty(2, 2)}, "no 2-D convolution"),
    ],
)
def test_nothing_eligible_is_a_checkpoint_problem(selector, state, expected):
    with pytest.raises(UserError) as info:
        select_layers([selector], conv_layers(state), state)
    assert not isinstance(info.value, UsageError)  # exit 1: no selector could fix it
    assert expected in str(info.value)


def test_real_squeezenet_layers():
    path = WEIGHTS / "squeezenet1_0_deepcompression_tvnorm.pth"
    if not path.is_file():
        pytest.skip(f"real checkpoint {path.name} not found in {WEIGHTS} (shared data absent)")
    state = load_checkpoint(path).state_dict
    layers = conv_layers(state)
    assert len(layers) == 26
    good = [layer for layer in layers if eligible(layer)]
    assert [layer.kernel_size for layer in good] == [(7, 7)] + [(3, 3)] * 8
    assert select(["all"], state)[0] == "features.0"


# --- fit-time estimate -----------------------------------------------------------------------


def test_estimate_fit_seconds():
    assert estimate_fit_seconds(0, (3, 3)) == 0.0
    small = estimate_fit_seconds(5000, (3, 3))
    # ResNet-50-shaped job (1.26 M 3x3 kernels, bench/fit_speed.py): 56 s of CPU on 2 cores,
    # i.e. ~0.22 s per 5000 kernels; the estimate must be within a factor of 2 of that.
    assert 0.11 < small < 0.45
    assert estimate_fit_seconds(10000, (3, 3)) == pytest.approx(2 * small)
    assert estimate_fit_seconds(5000, (3, 3), n_families=3) == pytest.approx(small / 2)
    assert estimate_fit_seconds(5000, (7, 7)) > small
