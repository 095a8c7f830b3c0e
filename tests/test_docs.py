"""Every Python snippet of the README and docs/ runs, so none can rot.

The snippets of one page run in order in one namespace, in a working folder that holds what
they refer to: ``squeezenet.pth`` (the real SqueezeNet 1.0), ``squeezenet.anann.safetensors``
and ``squeezenet.report.json`` (its ``features.0`` converted), ``images/`` (real labelled
sample images) and ``../shared`` (the shared data). A line ``<!-- test-setup: CODE -->`` just
before a snippet runs CODE first (stand-ins for the user's own data, e.g. ``batches``); a line
``<!-- not-tested: why -->`` skips the snippet that follows.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Fenced blocks at the start of a line; an indented one (inside a list) is an illustration.
BLOCK = re.compile(
    r"^(?:<!-- (?P<kind>test-setup|not-tested): (?P<text>.*?) -->\n)?```python\n(?P<code>.*?)```",
    re.S | re.M,
)


def snippets(page: Path) -> list[tuple[str, str, str]]:
    return [(m["kind"] or "", m["text"] or "", m["code"]) for m in BLOCK.finditer(page.read_text())]


PAGES_WITH_CODE = [p for p in PAGES if snippets(p)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, squeezenet_ckpt):
    """A folder laid out as the snippets expect (module-scoped: the conversion runs once)."""
    from conftest import DATA, IMAGES

    import acl_convert

    root = tmp_path_factory.mktemp("docs")
    (root / "shared").symlink_to(DATA.parent)
    work = root / "work"
    (work / "images").mkdir(parents=True)
    for f in sorted(IMAGES.glob("*.JPEG"))[:50]:
        shutil.copyfile(f, work / "images" / f.name)
    shutil.copyfile(DATA / "imagenet" / "imagenet_classes.tsv", work / "imagenet_classes.tsv")
    shutil.copyfile(squeezenet_ckpt, work / "squeezenet.pth")
    conversion = acl_convert.convert_checkpoint(work / "squeezenet.pth", "features.0")
    conversion.save(work / "squeezenet.anann.safetensors")
    import json

    (work / "squeezenet.report.json").write_text(json.dumps(conversion.report))
    return work


def test_every_page_with_python_is_collected():
    names = {p.name for p in PAGES_WITH_CODE}
    assert {"README.md", "finetuning.md", "report-format.md", "figures.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_snippets_run(page, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for kind, text, code in snippets(page):
        if kind == "not-tested":
            continue
        if kind == "test-setup":
            exec(compile("import torch\n" + text, f"{page.name} (setup)", "exec"), namespace)
        exec(compile(code, str(page.relative_to(REPO)), "exec"), namespace)
        ran += 1
    assert ran, f"no snippet of {page.name} ran"
