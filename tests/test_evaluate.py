"""``acl-convert evaluate`` (issue 5): accuracy on labelled image folders, checked against
predictions computed here independently with plain torchvision, for each of the three folder
layouts; ``--compare``; AnaNN vs its baked checkpoint; and every bad folder or label, each with
its one-line message and exit code.

The labels are made up on purpose: for six real sample images, four get the SqueezeNet's own
top-1 class, one the class it ranks second and one the class it ranks sixth, so the command must
report top-1 = 4/6 and top-5 = 5/6; an off-by-one in either k changes a count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from acl_convert.errors import UsageError, UserError
from acl_convert.io.labelled import labelled_images
from acl_convert.train.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
CLASSES_TSV = REPO.parent / "shared" / "data" / "imagenet" / "imagenet_classes.tsv"
SAMPLE_LABELS = REPO.parent / "shared" / "data" / "imagenet" / "sample-images-1000" / "labels.csv"
N_IMAGES = 6
# Rank (0 = highest logit) of the made-up label of each image: four right, one just outside the
# top-1, one just outside the top-5.
RANKS = [0, 0, 0, 0, 1, 5]
TOP1, TOP5 = 4 / 6, 5 / 6
KEYS = {"model", "arch", "data", "layout", "images", "top1", "top5"}
COMPARE_KEYS = KEYS | {"reference", "agreement", "logits_rel_error"}


def assert_quiet_error(result, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, empty stdout, and stderr is one ``error:`` line holding every
    needle (case-insensitive). As ``assert_quiet_error`` in test_cli.py."""
    everything = result.stdout + result.stderr
    assert result.exit_code == code, everything
    assert "Traceback" not in everything
    assert result.stdout == ""
    line = result.stderr.strip()
    assert line.startswith("error:") and "\n" not in line, result.stderr
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


def _wnids() -> list[str]:
    if not CLASSES_TSV.exists():
        pytest.skip(f"{CLASSES_TSV} not found (../shared/data absent)")
    rows = CLASSES_TSV.read_text().splitlines()[1:]
    return [row.split("\t")[1] for row in rows]


@pytest.fixture(scope="module")
def truth(tmp_path_factory, copy_images, squeezenet_ckpt):
    """The six images (file name -> made-up label), computed with torchvision alone."""
    folder = copy_images(tmp_path_factory.mktemp("truth"), N_IMAGES)
    model = torchvision.models.squeezenet1_0(weights=None)
    model.load_state_dict(torch.load(squeezenet_ckpt, weights_only=True))
    model.eval()
    transform = torchvision.models.SqueezeNet1_0_Weights.DEFAULT.transforms()
    from PIL import Image

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            return transform(img.convert("RGB"))

    files = sorted(folder.iterdir())
    with torch.no_grad():
        logits = model(torch.stack([load(f) for f in files]))
    top, order = logits.sort(dim=1, descending=True)
    # Neighbouring ranks far apart compared to float noise, so batching cannot swap them.
    assert float((top[:, :6] - top[:, 1:7]).min()) > 1e-3
    ranks = zip(files, RANKS, strict=True)
    labels = {f.name: int(order[i, rank]) for i, (f, rank) in enumerate(ranks)}
    # The expectations, recounted from the ranking rather than taken from RANKS.
    top1 = sum(int(order[i, 0]) == labels[f.name] for i, f in enumerate(files)) / len(files)
    top5 = sum(labels[f.name] in order[i, :5].tolist() for i, f in enumerate(files)) / len(files)
    assert (top1, top5) == (TOP1, TOP5)
    return {"folder": folder, "labels": labels}


def _write_csv(path: Path, rows: dict[str, int]) -> Path:
    # An extra column, as in the real labels.csv: it is allowed and ignored.
    lines = ["file,index,note"] + [f"{name},{label},x" for name, label in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def flat(tmp_path, truth) -> Path:
    """The six images in one folder with a ``labels.csv``."""
    folder = tmp_path / "flat"
    shutil.copytree(truth["folder"], folder)
    _write_csv(folder / "labels.csv", truth["labels"])
    return folder


def _json(result) -> dict:
    """The one JSON object of an ``--json -q`` run (nothing else on stdout or stderr)."""
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def _check_accuracy(doc: dict) -> None:
    assert doc["images"] == N_IMAGES
    assert doc["top1"] == pytest.approx(TOP1)
    assert doc["top5"] == pytest.approx(TOP5)


# --- the three layouts --------------------------------------------------------------------------


def test_flat_folder_with_labels_csv(invoke, squeezenet_ckpt, flat):
    doc = _json(invoke("evaluate", squeezenet_ckpt, "--data", flat, "--json", "-q"))
    assert set(doc) == KEYS
    _check_accuracy(doc)
    assert doc["arch"] == "squeezenet1_0"
    assert "labels.csv" in doc["layout"]


def test_labels_csv_given_from_elsewhere(invoke, squeezenet_ckpt, truth, tmp_path):
    csv = _write_csv(tmp_path / "my-labels.csv", truth["labels"])
    args = ["--data", truth["folder"], "--labels", csv, "--json", "-q"]
    _check_accuracy(_json(invoke("evaluate", squeezenet_ckpt, *args)))


def test_class_subfolders_in_sorted_order(invoke, squeezenet_ckpt, truth, tmp_path):
    """1000 class folders ``c000 .. c999``, most of them empty: as in torchvision's ImageFolder,
    an empty folder still takes its place in the sorted order."""
    folder = tmp_path / "classes"
    for c in range(1000):
        (folder / f"c{c:03d}").mkdir(parents=True)
    for name, label in truth["labels"].items():
        shutil.copyfile(truth["folder"] / name, folder / f"c{label:03d}" / name)
    doc = _json(invoke("evaluate", squeezenet_ckpt, "--data", folder, "--json", "-q"))
    _check_accuracy(doc)
    assert doc["layout"] == "class subfolders in sorted order"


def test_wnid_subfolders_take_indices_from_the_classes_tsv(
    invoke, squeezenet_ckpt, truth, tmp_path
):
    """Only the six classes' folders exist, so sorted order would give 0..5: the classes TSV,
    found in the parent folder, gives the real indices."""
    wnids = _wnids()
    shutil.copyfile(CLASSES_TSV, tmp_path / "imagenet_classes.tsv")
    folder = tmp_path / "wnid-folders"
    for name, label in truth["labels"].items():
        (folder / wnids[label]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(truth["folder"] / name, folder / wnids[label] / f"img-{name}")
    doc = _json(invoke("evaluate", squeezenet_ckpt, "--data", folder, "--json", "-q"))
    _check_accuracy(doc)
    assert "imagenet_classes.tsv" in doc["layout"]


@pytest.mark.parametrize("tsv", ["given", "in the parent"])
def test_wnid_file_names_with_classes_tsv(invoke, squeezenet_ckpt, truth, tmp_path, tsv):
    wnids = _wnids()
    folder = tmp_path / "named"
    folder.mkdir()
    for i, (name, label) in enumerate(truth["labels"].items()):
        shutil.copyfile(truth["folder"] / name, folder / f"{wnids[label]}_{i}.JPEG")
    args = ["--data", folder, "--json", "-q"]
    if tsv == "given":
        args += ["--classes", CLASSES_TSV]
    else:
        shutil.copyfile(CLASSES_TSV, tmp_path / "imagenet_classes.tsv")
    _check_accuracy(_json(invoke("evaluate", squeezenet_ckpt, *args)))


# --- output and --compare -----------------------------------------------------------------------


def test_table_on_stdout_progress_on_stderr(invoke, squeezenet_ckpt, flat):
    args = ["--data", flat, "--compare", squeezenet_ckpt, "--batch-size", "4"]
    result = invoke("evaluate", squeezenet_ckpt, *args)
    assert result.exit_code == 0, result.stderr
    model, reference = [line for line in result.stdout.splitlines() if ".pth" in line]
    assert "66.7 %" in model and "83.3 %" in model and "100.0 %" in model
    assert "(reference)" in reference and "66.7 %" in reference and "83.3 %" in reference
    assert "architecture detected: squeezenet1_0" in result.stderr
    assert "evaluating 6 images" in result.stderr and "100%" in result.stderr  # progress
    assert "66.7" not in result.stderr


def test_compare_with_itself(invoke, squeezenet_ckpt, flat):
    args = ["--data", flat, "--compare", squeezenet_ckpt, "--device", "cpu", "--json", "-q"]
    doc = _json(invoke("evaluate", squeezenet_ckpt, *args))
    assert set(doc) == COMPARE_KEYS
    _check_accuracy(doc)
    assert doc["agreement"] == 1.0
    assert doc["logits_rel_error"] == 0.0
    ref = {"model": str(squeezenet_ckpt), "top1": doc["top1"], "top5": doc["top5"]}
    assert doc["reference"] == ref


def test_limit(invoke, squeezenet_ckpt, flat):
    """``--limit 4`` takes the first four images in sorted order: the four labelled right."""
    doc = _json(invoke("evaluate", squeezenet_ckpt, "--data", flat, "--limit", "4", "--json", "-q"))
    assert (doc["images"], doc["top1"], doc["top5"]) == (4, 1.0, 1.0)


def test_evaluate_function_counts_by_hand():
    """A "model" whose logits are its input: top-k and the comparison are known exactly."""
    z = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    zr = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([1, 2])

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.register_buffer("logits", logits)

        def forward(self, x):
            return self.logits[x.long().flatten()]

    seen = []
    result = evaluate(
        Fixed(z),
        [(torch.arange(2.0), labels)],
        reference=Fixed(zr),
        topk=(1, 2),
        progress=seen.append,
    )
    assert result["images"] == 2 and seen == [2]
    assert result["top1"] == 0.5  # image 1: label 2 is its highest logit
    assert result["top2"] == 1.0
    assert result["reference"] == {"top1": 0.0, "top2": 0.5}
    assert result["agreement"] == 0.5
    assert result["logits_rel_error"] == pytest.approx((8 / 28) ** 0.5)


# --- AnaNN ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anann(tmp_path_factory, invoke, squeezenet_ckpt):
    out = tmp_path_factory.mktemp("anann")
    path = out / "sq.anann.safetensors"
    result = invoke(
        squeezenet_ckpt, "--layers", "features.0", "-o", path, "--report", out / "r.json", "-q"
    )
    assert result.exit_code == 0, result.stderr
    return path


@pytest.fixture
def real_labels(tmp_path, copy_images) -> Path:
    """Ten sample images with their true labels (rows of the real labels.csv)."""
    folder = copy_images(tmp_path / "real", 10)
    rows = SAMPLE_LABELS.read_text().splitlines()
    names = {p.name for p in folder.iterdir()}
    kept = [rows[0]] + [r for r in rows[1:] if r.split(",")[0] in names]
    (folder / "labels.csv").write_text("\n".join(kept) + "\n")
    return folder


@pytest.mark.slow
def test_anann_equals_its_baked_checkpoint(invoke, anann, real_labels, tmp_path):
    """The AnaNN, and its baked plain checkpoint evaluated as the reference of the same run."""
    baked = tmp_path / "baked.pth"
    assert invoke("bake", anann, "-o", baked, "-q").exit_code == 0
    args = ["--data", real_labels, "--compare", baked, "--json", "-q"]
    doc = _json(invoke("evaluate", anann, *args))
    assert doc["arch"] == "squeezenet1_0"
    assert doc["images"] == 10
    assert doc["top1"] == doc["reference"]["top1"]
    assert doc["top5"] == doc["reference"]["top5"]
    assert doc["agreement"] == 1.0
    assert doc["logits_rel_error"] < 1e-5


def test_anann_without_architecture_needs_arch(invoke, tmp_path, flat):
    g = torch.Generator().manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3, generator=g)}, ckpt)
    ana = tmp_path / "tiny.anann.safetensors"
    result = invoke(ckpt, "--layers", "conv1", "-o", ana, "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.stderr
    assert_quiet_error(
        invoke("evaluate", ana, "--data", flat, "-q"), 2, "records no architecture", "--arch"
    )


# --- bad input ----------------------------------------------------------------------------------


def test_missing_folder(invoke, squeezenet_ckpt, tmp_path):
    result = invoke("evaluate", squeezenet_ckpt, "--data", tmp_path / "nope", "-q")
    assert_quiet_error(result, 1, "nope", "does not exist", "check the path")


def test_folder_is_a_file(invoke, squeezenet_ckpt, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    result = invoke("evaluate", squeezenet_ckpt, "--data", tmp_path / "file.txt", "-q")
    assert_quiet_error(result, 1, "file.txt", "not a folder")


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_folder_without_images(invoke, squeezenet_ckpt, tmp_path, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    if content:
        (folder / content).write_text("not an image")
    result = invoke("evaluate", squeezenet_ckpt, "--data", folder, "-q")
    assert_quiet_error(result, 1, "empty", "contains no images", "point it at a folder of images")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(invoke, squeezenet_ckpt, flat, damage):
    """Sorted second and one image per batch, so it breaks inside the evaluation."""
    bad = flat / "n01440764_zz-bad.JPEG"
    if damage == "garbage":
        bad.write_bytes(b"this is not a jpeg" * 100)
    else:
        good = next(flat.glob("*.JPEG")).read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    _write_csv(flat / "labels.csv", {p.name: 1 for p in flat.glob("*.JPEG")})
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "--batch-size", "1", "-q")
    assert_quiet_error(
        result, 1, "n01440764_zz-bad.jpeg", "cannot read image", "remove or replace it"
    )


def test_unreadable_image(invoke, squeezenet_ckpt, flat, monkeypatch):
    """Permission denied, simulated (the tests may run as root, who reads everything)."""
    from PIL import Image

    victim = sorted(flat.glob("*.JPEG"))[3]
    real_open = Image.open

    def deny(fp, *args, **kwargs):
        if Path(fp) == victim:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 1, victim.name, "cannot read image", "PermissionError")


@pytest.mark.parametrize("label", [1000])
def test_label_out_of_range(invoke, squeezenet_ckpt, flat, truth, label):
    name = sorted(truth["labels"])[2]
    _write_csv(flat / "labels.csv", {**truth["labels"], name: label})
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 1, name, f"label {label}", "1000 classes 0..999")


def test_negative_label(invoke, squeezenet_ckpt, flat, truth):
    _write_csv(flat / "labels.csv", {**truth["labels"], sorted(truth["labels"])[0]: -1})
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 1, "labels.csv line 2", "negative", "start at 0")


def test_csv_names_a_missing_file(invoke, squeezenet_ckpt, flat, truth):
    _write_csv(flat / "labels.csv", {**truth["labels"], "ghost.JPEG": 3})
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 1, "ghost.jpeg", "not in", "remove those rows")


def test_image_missing_from_csv(invoke, squeezenet_ckpt, flat, truth):
    left_out = sorted(truth["labels"])[1]
    _write_csv(flat / "labels.csv", {k: v for k, v in truth["labels"].items() if k != left_out})
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 1, left_out, "no row in", "add rows")


@pytest.mark.parametrize(
    "text, needles",
    [
        ("name,label\na.JPEG,1\n", ["no column file, index", "file,index"]),
        ("file,index\n", ["no rows"]),
        ("file,index\nx.JPEG,tench\n", ["line 2", "'tench'", "not a whole number"]),
    ],
)
def test_bad_labels_csv(invoke, squeezenet_ckpt, flat, text, needles):
    (flat / "labels.csv").write_text(text)
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 1, "labels.csv", *needles)


def test_missing_labels_file(invoke, squeezenet_ckpt, truth, tmp_path):
    args = ["--data", truth["folder"], "--labels", tmp_path / "nope.csv", "-q"]
    assert_quiet_error(invoke("evaluate", squeezenet_ckpt, *args), 1, "nope.csv", "does not exist")


def test_wnid_names_without_classes_tsv(invoke, squeezenet_ckpt, truth, tmp_path):
    # The sample images are named by wnid, but no labels.csv or classes TSV is at hand.
    result = invoke("evaluate", squeezenet_ckpt, "--data", truth["folder"], "-q")
    assert_quiet_error(
        result, 1, "cannot tell the classes", "imagenet_classes.tsv", "--labels", "--classes"
    )


def test_name_without_wnid(invoke, squeezenet_ckpt, truth, tmp_path):
    folder = tmp_path / "named"
    shutil.copytree(truth["folder"], folder)
    shutil.copyfile(next(folder.iterdir()), folder / "holiday.jpg")
    _wnids()  # skips without the classes TSV
    args = ["--data", folder, "--classes", CLASSES_TSV, "-q"]
    result = invoke("evaluate", squeezenet_ckpt, *args)
    assert_quiet_error(result, 1, "holiday.jpg", "does not start with a wnid", "--labels")


def test_image_beside_class_folders(invoke, squeezenet_ckpt, truth, tmp_path):
    folder = tmp_path / "mixed"
    names = sorted(truth["labels"])
    (folder / "cat").mkdir(parents=True)
    shutil.copyfile(truth["folder"] / names[0], folder / "cat" / names[0])
    shutil.copyfile(truth["folder"] / names[1], folder / names[1])
    result = invoke("evaluate", squeezenet_ckpt, "--data", folder, "-q")
    assert_quiet_error(result, 1, names[1], "directly in", "move it into its class folder")


def test_labels_and_classes_together(invoke, squeezenet_ckpt, flat):
    args = ["--data", flat, "--labels", flat / "labels.csv", "--classes", CLASSES_TSV, "-q"]
    result = invoke("evaluate", squeezenet_ckpt, *args)
    assert_quiet_error(result, 2, "--labels and --classes", "give one of them")


def test_unknown_architecture_without_arch(invoke, tmp_path, flat):
    ckpt = tmp_path / "tiny.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, ckpt)
    result = invoke("evaluate", ckpt, "--data", flat, "-q")
    assert_quiet_error(result, 2, "tiny.pth", "not recognised", "pass --arch")


@pytest.mark.parametrize(
    "option, value, needles",
    [
        ("--limit", "0", ["--limit must be at least 1"]),
        ("--batch-size", "0", ["--batch-size must be at least 1"]),
        ("--device", "tpu", ["--device must be auto, cpu, cuda"]),
    ],
)
def test_bad_option_values(invoke, squeezenet_ckpt, flat, option, value, needles):
    result = invoke("evaluate", squeezenet_ckpt, "--data", flat, option, value, "-q")
    assert_quiet_error(result, 2, *needles)


# --- the library API ----------------------------------------------------------------------------


def test_labelled_images_api(flat, truth):
    data = labelled_images(flat)
    assert len(data) == N_IMAGES and data.num_classes == max(truth["labels"].values()) + 1
    assert {s.path.name: s.label for s in data.samples} == truth["labels"]
    images, labels = next(data.batches(lambda img: torch.zeros(3, 8, 8), batch_size=4))
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
    assert labels.tolist() == [s.label for s in data.samples[:4]]
    with pytest.raises(UsageError):
        labelled_images(flat, labels=flat / "labels.csv", classes=CLASSES_TSV)
    top = max(s.label for s in data.samples)
    data.check_labels(top + 1)
    with pytest.raises(UserError, match=f"has label {top} .* outside the model's {top} classes"):
        data.check_labels(top)


def test_help_lists_evaluate(invoke):
    assert "evaluate" in invoke("--help").stdout
    result = invoke("evaluate", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--data", "--labels", "--classes", "--compare", "--json", "--limit"):
        assert option in result.stdout
