"""Damaged and tampered AnaNN files (issue 13, class 4), generated with hypothesis.

Two small valid AnaNNs are made once with the command line (a user-shaped network of two convs,
one grouped, with batch norm and a linear head; untied and channel-tied). Each generated case
damages one of them: a header field removed, retyped or put out of range (every field of the
header is a candidate, by construction), the header not JSON or nested too deeply, a tensor
removed, reshaped, retyped, made non-finite or out of range, or a tensor added. A tensor damage
comes with the header's tensor list left as it was, updated to match (a tamperer who knows the
format: this reaches the reader's deeper checks) or removed (a file from before the list).

The invariant, for ``info``, ``export``, ``bake``, ``load_anann`` and the loader behind
``evaluate`` and ``finetune``: a one-line error (exit 1 or 2, exactly one ``error:`` line, no
traceback) or a correct result (a finite baked state dict, JSON from ``export``, a module whose
tensors are finite), and never a changed or added user file. ``evaluate`` and ``finetune``
themselves run on a fixed set of damages in :func:`test_evaluate_and_finetune_on_damaged_files`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import tiny_project
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from acl_convert import convert_model, load_anann
from acl_convert.errors import UserError
from acl_convert.io.anann import bake_state_dict, read_anann
from acl_convert.io.network import load_network
from acl_convert.kernels import PAPER_FAMILIES
from acl_convert.report import kernel_table

CASES = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Values a field is replaced by: every JSON type, out-of-range numbers, wrong-length lists.
REPLACEMENTS = [
    None,
    True,
    -1,
    0,
    2**63,
    1.5,
    -1e308,
    math.nan,
    "",
    "x",
    "G",
    [],
    [0],
    [1, 2, 3, 4, 5],
    [-1, 3, 3, 3],
    {},
    {"G": 1},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory, invoke) -> dict:
    """``{"folder", "arch", "files": {"plain": path, "tied": path}, "images"}``."""
    folder = tmp_path_factory.mktemp("anann-base")
    arch = tiny_project(folder, shade=40)
    ckpt = folder / "tiny.pth"
    files = {}
    for kind, extra in (("plain", ["--threshold", "0.6"]), ("tied", ["--tie-channels"])):
        out = folder / f"{kind}.anann.safetensors"
        result = invoke(ckpt, "-l", "all", "--arch", arch, "-q", "-o", out, *extra)
        assert result.exit_code == 0, result.stderr
        files[kind] = out
    images = folder / "imgs"
    return {"folder": folder, "arch": arch, "files": files, "ckpt": ckpt, "images": images}


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def write(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), meta)


def json_paths(doc, prefix=()) -> list[tuple]:
    """Every path into a JSON document (keys and list indices), inner nodes included."""
    out = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in items:
        out.append((*prefix, key))
        out.extend(json_paths(value, (*prefix, key)))
    return out


def mutate_json(doc: dict, path: tuple, action: str, value) -> dict:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_one_line_or_success(result) -> bool:
    """True on success; on failure assert the one-line contract."""
    everything = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), everything
    assert "Traceback" not in everything
    if result.exit_code == 0:
        return True
    assert result.exit_code in (1, 2), everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return False


def assert_contract(invoke, damaged: Path, arch: str) -> None:
    """Every reader of an AnaNN: a one-line error or a correct result; no file changed or
    added except the requested output."""
    folder = damaged.parent
    before, files_before = sha(damaged), {p.name for p in folder.iterdir()}
    info = invoke("info", damaged)
    if check_one_line_or_success(info):
        assert damaged.name in info.stdout
    exported = invoke("export", damaged, "--format", "json", "--plain")
    if check_one_line_or_success(exported):
        table = json.loads(exported.stdout)
        assert table["rows"] and {r["layer"] for r in table["rows"]} == set(
            read_anann(damaged).header.layers
        )
    baked = folder / "baked.safetensors"
    if check_one_line_or_success(invoke("bake", damaged, "-o", baked, "-q")):
        with safetensors.safe_open(str(baked), "pt") as f:
            assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
        baked.unlink()
    for load in (
        lambda: load_anann(damaged, arch=arch),
        lambda: load_network(damaged, arch=arch)[0],
    ):
        try:
            model = load()
        except UserError as exc:
            assert "\n" not in str(exc)
        else:
            assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert sha(damaged) == before, "a reader changed the file it read"
    assert {p.name for p in folder.iterdir()} == files_before, "a failed command left files"


def damaged_copy(base: dict, kind: str) -> tuple[Path, dict, dict]:
    folder = Path(tempfile.mkdtemp(dir=base["folder"]))
    meta, tensors = read(base["files"][kind])
    return folder / f"{kind}.anann.safetensors", meta, tensors


@st.composite
def header_damage(draw, base_docs: dict):
    kind = draw(st.sampled_from(sorted(base_docs)))
    doc = base_docs[kind]
    path = draw(st.sampled_from(json_paths(doc)))
    action = draw(st.sampled_from(["delete", "replace"]))
    value = draw(st.sampled_from(REPLACEMENTS))
    return kind, path, action, value


def base_docs(base: dict) -> dict:
    return {kind: json.loads(read(path)[0]["acl_convert"]) for kind, path in base["files"].items()}


def test_header_damage(base, invoke):
    docs = base_docs(base)

    @CASES
    @given(header_damage(docs))
    def check(case):
        kind, path, action, value = case
        target, meta, tensors = damaged_copy(base, kind)
        meta["acl_convert"] = json.dumps(mutate_json(docs[kind], path, action, value))
        write(target, meta, tensors)
        assert_contract(invoke, target, base["arch"])

    check()


@pytest.mark.parametrize(
    "header",
    [
        "not json {",
        "",
        "[" * 5000 + "]" * 5000,
        '{"a":' * 200 + "1" + "}" * 200,
        "null",
        '"a string"',
        json.dumps({"format": "acl-convert/anann", "format_version": 99}),
        "\udcff",
    ],
    ids=["not-json", "empty", "deep-list", "deep-object", "null", "string", "future", "bad-utf8"],
)
def test_header_not_a_header(base, invoke, header):
    target, meta, tensors = damaged_copy(base, "plain")
    meta["acl_convert"] = header.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    write(target, meta, tensors)
    assert_contract(invoke, target, base["arch"])


@pytest.mark.parametrize("key", ["acl_convert", "format"])
def test_metadata_key_missing(base, invoke, key):
    target, meta, tensors = damaged_copy(base, "plain")
    del meta[key]
    write(target, meta, tensors)
    assert_contract(invoke, target, base["arch"])


TENSOR_ACTIONS = [
    "delete",
    "reshape",
    "truncate",
    "retype",
    "nan",
    "inf",
    "huge",
    "large",
    "negative",
]


@st.composite
def tensor_damage(draw, keys: dict):
    kind = draw(st.sampled_from(sorted(keys)))
    action = draw(st.sampled_from([*TENSOR_ACTIONS, "extra"]))
    key = draw(st.sampled_from(keys[kind]))
    dtype = draw(
        st.sampled_from([torch.int64, torch.uint8, torch.float16, torch.float64, torch.bool])
    )
    manifest = draw(st.sampled_from(["stale", "updated", "removed"]))
    return kind, key, action, dtype, manifest


def apply_tensor_damage(tensors: dict, key: str, action: str, dtype) -> None:
    t = tensors[key]
    if action == "delete":
        del tensors[key]
    elif action == "reshape":
        tensors[key] = t.reshape(-1, 1) if t.ndim != 2 else t.reshape(-1)
    elif action == "truncate":
        tensors[key] = t.flatten()[: max(t.numel() - 1, 0)]
    elif action == "retype":
        tensors[key] = t.to(dtype)
    elif action in ("nan", "inf", "huge", "large", "negative") and t.numel():
        # Non-finite values make an integer tensor floating point; out-of-range values keep
        # the dtype (the largest a uint8 holds, an index far past the layer, a negative one).
        if t.is_floating_point() or action in ("nan", "inf"):
            value = {"nan": math.nan, "inf": math.inf, "huge": 3e38, "large": 1e30}
            value = value.get(action, -1e30)
            t = t.double() if not t.is_floating_point() else t.clone()
        else:
            big = 255 if t.dtype == torch.uint8 else 10**6
            value = {"large": big, "huge": big}.get(action, 0 if t.dtype == torch.uint8 else -1)
            t = t.clone()
        t.view(-1)[0] = value
        tensors[key] = t
    elif action == "extra":
        layer = key.split(".")[0]
        tensors[f"{layer}.akp.Zz"] = torch.zeros(2, 2)


def test_tensor_damage(base, invoke):
    keys = {kind: sorted(read(path)[1]) for kind, path in base["files"].items()}

    @CASES
    @given(tensor_damage(keys))
    def check(case):
        kind, key, action, dtype, manifest = case
        target, meta, tensors = damaged_copy(base, kind)
        apply_tensor_damage(tensors, key, action, dtype)
        header = json.loads(meta["acl_convert"])
        if manifest == "updated":
            header["tensors"] = {
                k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                for k, v in tensors.items()
            }
        elif manifest == "removed":
            header.pop("tensors", None)
        meta["acl_convert"] = json.dumps(header)
        write(target, meta, tensors)
        assert_contract(invoke, target, base["arch"])

    check()


@pytest.mark.parametrize(
    "key, action",
    [
        ("conv2.family", "large"),
        ("conv1.akp.G", "retype"),
        ("conv2.akp.G", "truncate"),
        ("conv1.gain.G", "delete"),
        ("fc.bias", "delete"),
        ("bn.running_var", "nan"),
    ],
)
def test_evaluate_and_finetune_on_damaged_files(base, invoke, key, action):
    """The two commands that build a network, on damages the header's tensor list agrees with
    (so only the deeper checks can catch them)."""
    target, meta, tensors = damaged_copy(base, "plain")
    apply_tensor_damage(tensors, key, action, torch.int64)
    header = json.loads(meta["acl_convert"])
    header.pop("tensors", None)
    meta["acl_convert"] = json.dumps(header)
    write(target, meta, tensors)
    folder, before = target.parent, sha(target)
    arch = ("--arch", base["arch"])
    result = invoke("evaluate", target, "--data", base["images"], *arch, "-q")
    assert not check_one_line_or_success(result)
    result = invoke(
        "finetune",
        target,
        "--data",
        base["images"],
        "--teacher",
        base["ckpt"],
        *arch,
        "-q",
        "-o",
        folder / "ft.anann.safetensors",
    )
    assert not check_one_line_or_success(result)
    assert sha(target) == before
    assert {p.name for p in folder.iterdir()} == {target.name}


@st.composite
def valid_conversion(draw):
    """A random small network and conversion settings that must convert, save, read back, load,
    bake and export consistently."""
    groups = draw(st.sampled_from([1, 2]))
    ci, co = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    h, w = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    bias = draw(st.booleans())
    families = draw(st.lists(st.sampled_from(PAPER_FAMILIES), min_size=1, max_size=3, unique=True))
    options = dict(
        families=families,
        offset=draw(st.booleans()),
        select=draw(st.sampled_from(["best", "compact"])),
        threshold=draw(st.floats(0.0, 0.95)),
        tie_channels=draw(st.booleans()),
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = nn.Sequential(nn.Conv2d(ci, co, (h, w), padding=1, groups=groups, bias=bias), nn.ReLU())
    return net, options


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(valid_conversion())
def test_valid_conversions_round_trip(case):
    net, options = case
    conversion = convert_model(net, "all", **options)
    x = torch.randn(2, net[0].in_channels, 7, 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = conversion.save(Path(tmp) / "net.anann.safetensors")
        again = conversion.save(Path(tmp) / "again.anann.safetensors")
        assert path.read_bytes() == again.read_bytes(), "the same conversion wrote other bytes"
        loaded = load_anann(path, model=copy.deepcopy(net)).eval()
        with torch.no_grad():
            expected = conversion.model(x)
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
            baked = copy.deepcopy(net)
            baked.load_state_dict(bake_state_dict(read_anann(path)), strict=True)
            torch.testing.assert_close(baked(x), expected, rtol=1e-4, atol=1e-4)
        co, cig = net[0].weight.shape[:2]
        assert kernel_table.write(read_anann(path), io.StringIO(), "jsonl", plain=True) == co * cig
