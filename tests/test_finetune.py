"""Fine-tuning (issue 5): distillation lowers its loss and moves the AKPs, only the chosen groups
learn, resume continues exactly, and a fine-tuned AnaNN loads, bakes and exports like a
converted one."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms as T

from acl_convert import ACL, load_anann
from acl_convert.errors import UsageError, UserError
from acl_convert.io.anann import read_anann
from acl_convert.io.images import load_image
from acl_convert.train.finetune import (
    FinetuneConfig,
    acl_layers,
    finetune,
    param_groups,
    state_path,
)

# Small images keep the real SqueezeNet cheap on a CPU; the network accepts any size >= ~64.
SMALL = T.Compose(
    [
        T.Resize(96),
        T.CenterCrop(96),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)


def load(paths):
    return torch.stack([load_image(p, SMALL) for p in paths]), None


@pytest.fixture(scope="module")
def setup(tmp_path_factory, squeezenet_ckpt, copy_images, invoke):
    """A real SqueezeNet AnaNN (conv1 at tau = 0.5, so many ACKs), its teacher and 8 images."""
    tmp = tmp_path_factory.mktemp("ft")
    anann = tmp / "sq.anann.safetensors"
    args = [squeezenet_ckpt, "-l", "features.0", "-t", "0.5", "-o", anann]
    result = invoke(*args, "--report", tmp / "sq.json", "-q")
    assert result.exit_code == 0, result.stderr
    images = sorted(copy_images(tmp / "imgs", 8).iterdir())
    teacher = torchvision.models.squeezenet1_0(weights=None).eval()
    teacher.load_state_dict(torch.load(squeezenet_ckpt, weights_only=True))
    return {"anann": anann, "images": images, "teacher": teacher, "tmp": tmp}


def distill_loss(student, teacher, images) -> float:
    x, _ = load(images)
    student.eval()  # SqueezeNet's classifier has dropout
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    return float(
        torch.nn.functional.kl_div(
            zs.log_softmax(1), zt.log_softmax(1), log_target=True, reduction="batchmean"
        )
    )


def layer_error(student, teacher, images) -> float:
    """Relative squared error of conv1's output, fed the same input in both networks."""
    x, _ = load(images)
    with torch.no_grad():
        got = student.features[0](x)
        want = teacher.features[0](x)
    return float((got - want).square().sum() / want.square().sum())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["logits", "layers"])
def test_distillation_lowers_the_loss_and_moves_only_the_akps(setup, tmp_path, objective):
    student = load_anann(setup["anann"])
    before = snapshot(student)
    measure = distill_loss if objective == "logits" else layer_error
    loss0 = measure(student, setup["teacher"], setup["images"])
    lr = {"akp": 1e-3, "plain": 1e-3, "rest": 1e-4}  # SqueezeNet conv1 takes 1e-3 well
    config = FinetuneConfig(objective=objective, train=("akp",), lr=lr, epochs=3, batch_size=4)
    out = tmp_path / "ft.anann.safetensors"
    losses = finetune(
        student,
        setup["images"],
        load,
        config,
        output=out,
        header=read_anann(setup["anann"]).header,
        teacher=setup["teacher"],
    )
    assert len(losses) == 3
    assert loss0 > 0
    assert measure(student, setup["teacher"], setup["images"]) < 0.97 * loss0
    after = snapshot(student)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".akp." in k for k in moved), moved
    # Only AKPs, gains and offsets of the ACL may change; plain kernels, biases, the rest: not.
    assert all(
        k.startswith("features.0.") and k.split(".")[2] in ("akp", "gain", "offset") for k in moved
    ), moved


def test_param_groups_split_freeze_and_scale():
    net = nn.Sequential(
        ACL.from_pattern(3, 4, 3, "G4Lg4P4", gain=True, offset=True), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    with torch.no_grad():
        net[0].gain["G"].fill_(20.0)
        net[2].weight.fill_(-0.01)
        kernel_rms = float(net[0].synthesize().square().mean().sqrt())
    groups = param_groups(net, FinetuneConfig(train=("akp", "rest")))
    by_param = {g["param"]: g for g in groups}
    # akp: AKPs + gains + offsets of G and Lg; rest: ACL bias + conv weight + bias.
    assert {g["name"] for g in groups} == {"akp", "rest"}
    assert sorted(k for k, g in by_param.items() if g["name"] == "akp") == [
        "0.akp.G",
        "0.akp.Lg",
        "0.gain.G",
        "0.gain.Lg",
        "0.offset.G",
        "0.offset.Lg",
    ]
    assert sorted(k for k, g in by_param.items() if g["name"] == "rest") == [
        "0.bias",
        "2.bias",
        "2.weight",
    ]
    assert by_param["0.akp.G"]["lr"] == 3e-4  # AKPs: log-scales and radians, as they are
    # Gains and offsets move on the scale of the layer's kernels, other tensors on their own.
    assert by_param["0.gain.G"]["lr"] == pytest.approx(kernel_rms * 3e-4)
    assert by_param["0.offset.Lg"]["lr"] == pytest.approx(kernel_rms * 3e-4)
    assert by_param["2.weight"]["lr"] == pytest.approx(0.01 * 1e-4)
    assert net[0].plain.requires_grad is False
    assert all(g["params"][0].requires_grad for g in groups)


def test_param_groups_need_acls():
    with pytest.raises(UserError, match="no ACL layers"):
        param_groups(nn.Conv2d(3, 4, 3), FinetuneConfig())


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"objective": "mse"}, "objective must be one of"),
        ({"train": ("akp", "bn")}, "subset of akp, plain, rest"),
        ({"train": ()}, "subset of"),
        ({"objective": "layers", "train": ("rest",)}, "trains only the ACLs"),
        ({"lr": {"akp": -1.0}}, "learning rate of akp"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_settings(changes, needle):
    with pytest.raises(UsageError, match=needle):
        FinetuneConfig(**changes).check()


def test_resume_continues_exactly(setup, tmp_path):
    header = read_anann(setup["anann"]).header
    config = FinetuneConfig(objective="layers", train=("akp", "plain"), batch_size=4)
    kwargs = {"header": header, "teacher": setup["teacher"]}

    straight = load_anann(setup["anann"])
    both = finetune(
        straight,
        setup["images"],
        load,
        FinetuneConfig(**{**config.__dict__, "epochs": 2}),
        output=tmp_path / "a.anann.safetensors",
        **kwargs,
    )

    out = tmp_path / "b.anann.safetensors"
    first = finetune(
        load_anann(setup["anann"]), setup["images"], load, config, output=out, **kwargs
    )
    assert state_path(out).is_file()
    assert first == pytest.approx(both[:1])
    resumed = load_anann(setup["anann"])  # fresh weights: resume must bring back epoch 1's
    again = finetune(
        resumed,
        setup["images"],
        load,
        FinetuneConfig(**{**config.__dict__, "epochs": 2}),
        output=out,
        resume=True,
        **kwargs,
    )
    assert again == pytest.approx(both, rel=1e-5)
    for k, v in snapshot(straight).items():
        torch.testing.assert_close(snapshot(resumed)[k], v, rtol=1e-5, atol=1e-6)
    assert read_anann(out).header["finetune"]["epochs_done"] == 2


def test_resume_without_state_and_with_other_settings(setup, tmp_path):
    header = read_anann(setup["anann"]).header
    out = tmp_path / "c.anann.safetensors"
    config = FinetuneConfig(objective="layers", batch_size=8)
    with pytest.raises(UserError, match="no training state"):
        finetune(
            load_anann(setup["anann"]),
            setup["images"][:2],
            load,
            config,
            output=out,
            header=header,
            teacher=setup["teacher"],
            resume=True,
        )
    finetune(
        load_anann(setup["anann"]),
        setup["images"][:2],
        load,
        config,
        output=out,
        header=header,
        teacher=setup["teacher"],
    )
    other = FinetuneConfig(objective="layers", batch_size=4, epochs=2)
    with pytest.raises(UsageError, match="batch_size"):
        finetune(
            load_anann(setup["anann"]),
            setup["images"][:2],
            load,
            other,
            output=out,
            header=header,
            teacher=setup["teacher"],
            resume=True,
        )


def test_distillation_needs_a_teacher_and_labels_need_labels(setup, tmp_path):
    header = read_anann(setup["anann"]).header
    out = tmp_path / "d.anann.safetensors"
    with pytest.raises(UsageError, match="teacher"):
        finetune(
            load_anann(setup["anann"]),
            setup["images"],
            load,
            FinetuneConfig(),
            output=out,
            header=header,
        )
    with pytest.raises(UserError, match="labelled images"):
        finetune(
            load_anann(setup["anann"]),
            setup["images"][:2],
            load,
            FinetuneConfig(objective="labels"),
            output=out,
            header=header,
        )
    assert not out.exists()


def test_finetuned_anann_loads_bakes_and_exports(setup, tmp_path, invoke):
    header = read_anann(setup["anann"]).header
    out = tmp_path / "e.anann.safetensors"
    student = load_anann(setup["anann"])
    finetune(
        student,
        setup["images"][:4],
        load,
        FinetuneConfig(objective="layers", train=("akp", "plain"), lr={"akp": 0.05, "plain": 1e-3}),
        output=out,
        header=header,
        teacher=setup["teacher"],
    )
    loaded = load_anann(out).eval()
    x, _ = load(setup["images"][:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student.eval()(x), rtol=1e-4, atol=1e-4)
    # Saved AKPs are canonical: theta in [0, pi) for every family that has one.
    for acl in acl_layers(loaded).values():
        for code in acl.codes_present():
            if code in ("G", "Tf", "Ts"):
                theta = acl.akps(code)[:, 1 if code == "G" else 0]
                assert ((theta >= 0) & (theta < torch.pi)).all()

    baked = tmp_path / "e.baked.safetensors"
    assert invoke("bake", out, "-o", baked, "-q").exit_code == 0
    net = torchvision.models.squeezenet1_0(weights=None).eval()
    net.load_state_dict(load_file(baked), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x), loaded(x), rtol=1e-4, atol=1e-4)

    result = invoke("export", out, "--format", "json", "--plain")
    assert result.exit_code == 0, result.stderr
    table = json.loads(result.stdout)
    assert len(table["rows"]) == 288


# --- the command line -------------------------------------------------------------------------


def assert_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0].lower(), (needle, lines[0])


@pytest.fixture
def cli_setup(setup, tmp_path, monkeypatch, squeezenet_ckpt):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "imgs"
    data.mkdir()
    for p in setup["images"][:3]:
        (data / p.name).write_bytes(p.read_bytes())
    return {"anann": setup["anann"], "data": data, "teacher": squeezenet_ckpt, "tmp": tmp_path}


def test_cli_distils_writes_and_resumes(cli_setup, invoke):
    s = cli_setup
    args = ["finetune", s["anann"], "--data", s["data"], "--teacher", s["teacher"]]
    result = invoke(*args, "--batch-size", "2", "-q")
    assert result.exit_code == 0, result.stderr
    out = s["tmp"] / "sq.ft.anann.safetensors"
    assert out.is_file() and state_path(out).is_file()
    assert "mean loss" in result.stdout and result.stderr == ""
    record = read_anann(out).header["finetune"]
    assert record["epochs_done"] == 1 and record["objective"] == "logits"
    assert record["train"] == ["akp"] and len(record["losses"]) == 1

    again = invoke(*args, "--batch-size", "2", "--epochs", "2", "--resume", "-q")
    assert again.exit_code == 0, again.stderr
    record2 = read_anann(out).header["finetune"]
    assert record2["epochs_done"] == 2
    assert record2["losses"][0] == pytest.approx(record["losses"][0])
    assert load_anann(out) is not None


def test_cli_labels_objective(cli_setup, invoke):
    s = cli_setup
    (s["data"] / "labels.csv").write_text(
        "file,index\n"
        + "".join(f"{p.name},{k}\n" for k, p in enumerate(sorted(s["data"].glob("*.JPEG"))))
    )
    result = invoke(
        "finetune",
        s["anann"],
        "--data",
        s["data"],
        "--objective",
        "labels",
        "-o",
        "l.anann.safetensors",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    assert read_anann(s["tmp"] / "l.anann.safetensors").header["finetune"]["objective"] == "labels"


def test_cli_bad_input(cli_setup, invoke, files_in):
    s = cli_setup
    base = ["finetune", s["anann"], "--data", s["data"], "-q"]
    before = files_in(s["tmp"])
    assert_error(invoke(*base), 2, "--teacher")
    assert_error(
        invoke(*base, "--teacher", s["teacher"], "--train", "akp,bn"), 2, "akp, plain, rest"
    )
    assert_error(invoke(*base, "--teacher", s["teacher"], "--resume"), 1, "no training state")
    assert_error(invoke(*base, "--teacher", s["teacher"], "--lr-akp", "0"), 2, "learning rate")
    empty = s["tmp"] / "empty"
    empty.mkdir()
    before.add("empty")
    assert_error(
        invoke("finetune", s["anann"], "--data", empty, "--teacher", s["teacher"], "-q"),
        1,
        "no images",
    )
    (s["tmp"] / "sq.ft.anann.safetensors").write_text("keep")
    before.add("sq.ft.anann.safetensors")
    assert_error(invoke(*base, "--teacher", s["teacher"]), 2, "already exists", "--force")
    assert files_in(s["tmp"]) == before
    assert (s["tmp"] / "sq.ft.anann.safetensors").read_text() == "keep"
