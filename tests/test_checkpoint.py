"""Tests of checkpoint loading: formats, wrappers, prefixes, and every kind of bad file.

Made-up files go to ``tmp_path``; the real checkpoints in ``../shared/data/weights`` are only
read (and copied, cut short, into ``tmp_path``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from acl_convert.errors import UsageError, UserError
from acl_convert.io import checkpoint as checkpoint_module
from acl_convert.io.checkpoint import WRAPPER_KEYS, Checkpoint, load_checkpoint, sha256_file

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weights"
SQUEEZENET = WEIGHTS / "squeezenet1_0_deepcompression_tvnorm.pth"
SQUEEZENET_SHA = "fa6fd9f03b2516be0578a3ad59b00fa7a111249e720b86d0d95bbfd92ac6fe73"
TORCHSCRIPT = WEIGHTS / "mobilenet_quantized2.pt"


def real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real checkpoint {path.name} not found in {path.parent} (shared data absent)")
    return path


class TinyNet(nn.Module):
    """A small CNN; module-level so that a pickled instance can be loaded back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TinyNet().state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def load_error(path: Path, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert not isinstance(info.value, UsageError), "bad files are exit code 1, not usage errors"
    return info.value


# --- good files -----------------------------------------------------------------------------


def test_torch_zip_roundtrip(tmp_path):
    state = small_state()
    path = tmp_path / "net.pth"
    torch.save(state, path)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert_same(ckpt.state_dict, state)
    assert ckpt.format == "torch"
    assert ckpt.path == path
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert ckpt.nested_key is None and ckpt.stripped_prefix is None
    assert ckpt.metadata == {} and ckpt.dropped == []


def test_torch_legacy_format(tmp_path):
    state = small_state()
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(path).state_dict, state)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".weights", ""])
def test_format_from_content_not_suffix(tmp_path, suffix):
    state = small_state()
    torch_file = tmp_path / f"t{suffix}"
    torch.save(state, torch_file)
    assert load_checkpoint(torch_file).format == "torch"
    st_file = tmp_path / f"s{suffix}"
    safetensors.torch.save_file(state, st_file)
    assert load_checkpoint(st_file).format == "safetensors"


def test_safetensors_with_metadata_and_natural_order(tmp_path):
    state = {f"features.{i}.weight": torch.full((2, 1, 3, 3), float(i)) for i in (0, 2, 10, 11)}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, path, metadata={"arch": "demo"})
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"arch": "demo"}
    # safetensors stores keys sorted as text ("features.10" < "features.2"); natural order is back
    assert list(ckpt.state_dict) == list(state)
    assert_same(ckpt.state_dict, state)


@pytest.mark.parametrize("key", WRAPPER_KEYS)
def test_nested_under_wrapper_key(tmp_path, key):
    state = small_state()
    path = tmp_path / "nested.pth"
    torch.save({key: state, "epoch": 7, "optimizer": {"state": {}, "param_groups": []}}, path)
    ckpt = load_checkpoint(path)
    assert_same(ckpt.state_dict, state)
    assert ckpt.nested_key == key
    assert sorted(ckpt.dropped) == ["epoch", "optimizer"]


def test_nested_two_levels_and_main_weights_before_ema(tmp_path):
    state = small_state()
    ema = {k: v + 1 for k, v in state.items()}
    path = tmp_path / "lightning.ckpt"
    torch.save({"model": {"state_dict": state, "step": 3}, "model_ema": ema}, path)
    ckpt = load_checkpoint(path)
    assert_same(ckpt.state_dict, state)
    assert ckpt.nested_key == "model/state_dict"
    assert sorted(ckpt.dropped) == ["model/step", "model_ema"]


def test_flat_dict_with_stray_entries_is_not_descended(tmp_path):
    # A state dict that has a "weights" entry of few tensors next to many of its own stays as is.
    state = small_state()
    path = tmp_path / "flat.pth"
    torch.save({**state, "epoch": 3, "weights": {"x": torch.ones(1)}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.nested_key is None
    assert_same(ckpt.state_dict, state)
    assert sorted(ckpt.dropped) == ["epoch", "weights"]


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_stripped(tmp_path, prefix):
    state = small_state()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, path)
    ckpt = load_checkpoint(path)
    assert_same(ckpt.state_dict, state)
    assert ckpt.stripped_prefix == prefix


def test_safetensors_prefix_stripped(tmp_path):
    state = small_state()
    path = tmp_path / "ddp.safetensors"
    safetensors.torch.save_file({"module." + k: v for k, v in state.items()}, path)
    ckpt = load_checkpoint(path)
    assert set(ckpt.state_dict) == set(state) and ckpt.stripped_prefix == "module."


def test_prefix_kept_unless_every_key_has_it(tmp_path):
    state = {"module.conv.weight": torch.ones(1, 1, 3, 3), "head.weight": torch.ones(2, 2)}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    ckpt = load_checkpoint(path)
    assert list(ckpt.state_dict) == list(state)
    assert ckpt.stripped_prefix is None


def test_real_checkpoint_loads():
    ckpt = load_checkpoint(real(SQUEEZENET))
    assert ckpt.sha256 == SQUEEZENET_SHA
    assert ckpt.state_dict["features.0.weight"].shape == (96, 3, 7, 7)
    assert len(ckpt.state_dict) == 52  # 26 convs, weight + bias


# --- pickles ---------------------------------------------------------------------------------


def test_whole_pickled_model_refused_then_trusted(tmp_path):
    torch.manual_seed(0)
    net = TinyNet()
    path = tmp_path / "whole.pth"
    torch.save(net, path)
    message = str(load_error(path))
    assert "execute code" in message and "--trust-pickle" in message
    assert "TinyNet" in message
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert_same(ckpt.state_dict, net.state_dict())


def test_pickled_model_inside_a_dict_trusted(tmp_path):
    net = TinyNet()
    path = tmp_path / "yolo_style.pt"
    torch.save({"model": net, "epoch": 1}, path)
    load_error(path)
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.nested_key == "model"
    assert_same(ckpt.state_dict, net.state_dict())


def test_custom_objects_next_to_weights_refused(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": small_state(), "args": argparse.Namespace(lr=0.1)}, path)
    assert "argparse.Namespace" in str(load_error(path))
    assert load_checkpoint(path, trust_pickle=True).dropped == ["args"]


def test_trusted_pickle_of_unimportable_class(tmp_path):
    path = tmp_path / "ghost.pth"
    torch.save(TinyNet(), path)
    # Rename the class reference inside the pickle so it cannot be found at load time.
    data = path.read_bytes().replace(b"TinyNet", b"GhostNt")
    path.write_bytes(data)
    message = str(load_error(path, trust_pickle=True))
    assert "not importable" in message and "state_dict()" in message


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still in use
def test_torchscript_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(1, 1, 3)), path)
    for trust in (False, True):
        assert "TorchScript" in str(load_error(path, trust_pickle=trust))


def test_real_torchscript_refused():
    assert "TorchScript" in str(load_error(real(TORCHSCRIPT)))


# --- bad files -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = str(load_error(tmp_path / "nope.pth"))
    assert "no such file" in message and "check the path" in message


def test_folder(tmp_path):
    assert "is a folder" in str(load_error(tmp_path))


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.pth"
    torch.save(small_state(), path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Root can read anything, so the permission error is simulated at the module's open().
    monkeypatch.setattr(checkpoint_module, "open", denied, raising=False)
    message = str(load_error(path))
    assert "not readable" in message and "permission" in message


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root can read files without read permission",
)
def test_unreadable_file_chmod(tmp_path):
    path = tmp_path / "locked.pth"
    torch.save(small_state(), path)
    path.chmod(0)
    try:
        assert "not readable" in str(load_error(path))
    finally:
        path.chmod(0o600)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    message = str(load_error(path))
    assert "is empty" in message and "re-download" in message


@pytest.mark.parametrize("name", ["notes.txt", "notes.pth"])
def test_text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are my notes, not weights\n")
    message = str(load_error(path))
    assert "not a checkpoint (a text file)" in message and ".safetensors" in message


def test_html_page(tmp_path):
    path = tmp_path / "resnet50.pth"
    path.write_text("<!DOCTYPE html>\n<html><body>404</body></html>")
    assert "download the file again" in str(load_error(path))


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "resnet50.pth"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 102\n")
    assert "git lfs pull" in str(load_error(path))


@pytest.mark.parametrize(
    "suffix, expected", [(".pth", "truncated or corrupt"), (".dat", "not a checkpoint")]
)
def test_random_bytes(tmp_path, suffix, expected):
    data = bytearray(random.Random(1).randbytes(4096))
    data[0] = 0x13  # not a zip / pickle magic, whatever the generator gives
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(bytes(data))
    assert expected in str(load_error(path))


def test_random_bytes_after_pickle_magic(tmp_path):
    # Starts like a pickle, so torch reads it; its garbage is corruption, not a refused pickle.
    path = tmp_path / "noise.pth"
    path.write_bytes(b"\x80" + random.Random(2).randbytes(4096))
    message = str(load_error(path))
    assert "truncated or corrupt" in message and "--trust-pickle" not in message


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.01])
def test_truncated_zip(tmp_path, fraction):
    full = tmp_path / "full.pth"
    torch.save({"w": torch.randn(64, 64)}, full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: max(5, int(len(data) * fraction))])
    message = str(load_error(cut))
    assert "truncated or corrupt" in message and "re-download or re-export" in message


def test_legacy_whole_model_refused(tmp_path):
    path = tmp_path / "whole_legacy.pth"
    torch.save(TinyNet(), path, _use_new_zipfile_serialization=False)
    assert "--trust-pickle" in str(load_error(path))
    assert "conv1.weight" in load_checkpoint(path, trust_pickle=True).state_dict


@pytest.mark.parametrize("content", ["dict", "model"])
def test_truncated_legacy_at_every_length(tmp_path, content):
    # Cuts inside a class name ("collections.Ordered|Dict") must read as damage, never as a
    # pickle to refuse; so every cut point of the pickled part is tried.
    obj = {"w": torch.randn(8, 8)} if content == "dict" else TinyNet()
    full = tmp_path / "full.pt"
    torch.save(obj, full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in range(1, min(len(data), 1200), 7):
        cut.write_bytes(data[:n])
        message = str(load_error(cut))
        assert "truncated or corrupt" in message, (n, message)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(tmp_path, keep):
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file({"w": torch.randn(64, 64)}, full)
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert "truncated or corrupt" in str(load_error(cut))


def test_real_file_cut_in_half(tmp_path, sample_ckpt):
    data = sample_ckpt.read_bytes()
    cut = tmp_path / sample_ckpt.name
    cut.write_bytes(data[: len(data) // 2])
    message = str(load_error(cut))
    assert message.startswith(str(cut)) and "truncated or corrupt" in message


def test_no_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "best_acc": 0.7}, path)
    assert "does not contain any tensors" in str(load_error(path))
    torch.save([1, 2, 3], path)
    assert "does not contain any tensors" in str(load_error(path))


def test_single_tensor(tmp_path):
    path = tmp_path / "one.pt"
    torch.save(torch.ones(3), path)
    assert "single tensor" in str(load_error(path))
