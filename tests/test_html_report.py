"""The HTML report: escaped text, embedded images, nothing fetched from anywhere, and a real
browser (headless Chromium) that decodes every image and lays out the tables."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acl_convert.report.html import figure, page, render_html, section, table

NASTY = '<b>conv&"1"</b>[0]'


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _layer(name: str, output_error=None) -> dict:
    return {
        "name": name,
        "shape": [4, 3, 7, 7],
        "groups": 1,
        "kernels": 12,
        "converted": 5,
        "family_counts": {"G": 4, "M": 1, "P": 7},
        "pattern": "(3x4)G4M1P7",
        "compact_factor": 0.3125,
        "params_before": 588,
        "params_after": 404,
        "residual": {"median": 0.21, "p90": 0.28, "max": 0.29},
        "output_residual": None,
        "output_error": output_error,
        "best_residual": {"median": 0.35, "p90": 0.6, "max": 0.9},
    }


def _report(*, fidelity: bool = False, output_error: bool = False) -> dict:
    err = {"fitted": 0.052, "resolved": 0.031} if output_error else None
    layers = [_layer(NASTY, err), _layer("features.3")]
    return {
        "format": "acl-convert/report",
        "format_version": 1,
        "tool_version": "0.1.0",
        "source": {"file": "model<&>.pth", "sha256": "ab" * 32},
        "arch": None,
        "settings": {"families": ["G", "Lg"], "threshold": 0.3, "select": "best"},
        "layers": layers,
        "totals": {
            "layers": 2,
            "kernels": 24,
            "converted": 10,
            "params_before": 1176,
            "params_after": 808,
            "compact_factor": 0.3129,
        },
        "fidelity": {
            "images": 16,
            "logits_rel_error": 0.0421,
            "top1_agreement": 0.9375,
            "layer_rel_error": {NASTY: 0.012},
        }
        if fidelity
        else None,
    }


def _images() -> dict[str, list[tuple[str, bytes]]]:
    return {
        NASTY: [("kernels of <b>", _png((200, 30, 30))), ("summary & more", _png((30, 90, 230)))],
        "features.3": [("kernels", _png((20, 160, 60)))],
    }


def test_every_value_is_escaped():
    out = render_html(_report(fidelity=True), _images(), title="report <for> & you")
    assert "<b>conv" not in out and "model<&>" not in out and "report <for>" not in out
    assert "&lt;b&gt;conv&amp;&quot;1&quot;&lt;/b&gt;[0]" in out
    assert "model&lt;&amp;&gt;.pth" in out
    assert "<title>report &lt;for&gt; &amp; you</title>" in out
    assert 'alt="kernels of &lt;b&gt;"' in out


def test_images_are_embedded_and_nothing_is_fetched():
    images = _images()
    out = render_html(_report(), images, title="t")
    sources = re.findall(r'src="([^"]*)"', out)
    assert len(sources) == 3
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert embedded == [png for pairs in images.values() for _, png in pairs]
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    # No address to fetch: no scheme, no script, no external style; links stay in the page.
    assert "http:" not in out and "https:" not in out and "<script" not in out
    assert "<link" not in out and "@import" not in out and "url(" not in out
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', out))


def test_summary_table_totals_and_links():
    out = render_html(_report(), _images(), title="t")
    assert out.count("<tr>") == 1 + 2  # the header and one row per layer; the total is apart
    assert '<tr class="total">' in out and "1,176" in out and "808" in out
    assert '<a href="#layer-0">' in out and 'id="layer-0"' in out and 'id="layer-1"' in out
    assert "0.210\u00a0/\u00a00.280\u00a0/\u00a00.290" in out
    assert "G\u00a04 M\u00a01 P\u00a07" in out
    assert "output error" not in out and "Fidelity" not in out


def test_fidelity_and_output_error_when_present():
    out = render_html(_report(fidelity=True, output_error=True), _images(), title="t")
    assert "<h2>Fidelity</h2>" in out and "0.0421" in out and "0.9375" in out
    assert "0.0520 -&gt; 0.0310" in out
    assert "output error" in out


def test_images_for_other_names_get_their_own_sections():
    out = render_html(_report(), {"sweep": [("curve", _png((0, 0, 0)))]}, title="t")
    assert "<h2>sweep</h2>" in out and out.count("<img") == 1


def test_parts_for_other_pages():
    html = page(
        "sweep",
        [section("points", table(["compact", "error"], [[0.5, 0.01], [0.6, None]]))],
        subtitle="a & b",
    )
    assert html.startswith("<!DOCTYPE html>") and "a &amp; b" in html
    assert '<td class="num">0.5</td><td class="num">0.01</td>' in html
    assert '<td class="num">-</td>' in html or "<td>-</td>" in html
    with pytest.raises(ValueError, match="PNG"):
        figure("not a png", b"GIF89a")


# --- in a real browser --------------------------------------------------------------------------

# Written into a copy of the page by the test only (the report itself has no script): after the
# load event, record how many images decoded and how the tables laid out.
_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var decoded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var tables = Array.from(document.querySelectorAll("table"));
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = "PROBE images=" + imgs.length + " decoded=" + decoded.length +
    " tables=" + tables.length +
    " rows=" + document.querySelectorAll("tr").length +
    " narrowest=" + Math.min.apply(null, tables.map(function (t) { return t.offsetWidth; }));
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium on PATH (apt-get install -y chromium); .ci/run installs it")


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=60, check=True
    )


def test_page_in_headless_chromium(tmp_path):
    browser = _chromium()
    out = render_html(_report(fidelity=True, output_error=True), _images(), title="t")
    path = tmp_path / "report.html"
    path.write_text(out, encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(out.replace("</body>", _PROBE + "</body>"), encoding="utf-8")

    dom = _run_chromium(browser, tmp_path / "profile-a", "--dump-dom", probe.as_uri()).stdout
    found = re.search(
        r"PROBE images=(\d+) decoded=(\d+) tables=(\d+) rows=(\d+) narrowest=(\d+)", dom
    )
    assert found, dom[-2000:]
    images, decoded, tables, rows, narrowest = map(int, found.groups())
    assert images == decoded == 3
    assert tables == 3  # summary, fidelity, per-layer fidelity
    assert rows == (1 + 2 + 1) + (1 + 3) + (1 + 1)
    assert narrowest > 100

    shot = tmp_path / "shot.png"
    _run_chromium(
        browser, tmp_path / "profile-b", f"--screenshot={shot}", "--window-size=1280,1600",
        path.as_uri(),
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1280)
    # Not blank: text, table rules and the three coloured test images are on it.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    for colour in ((200, 30, 30), (30, 90, 230), (20, 160, 60)):
        assert (np.abs(pixels.astype(int) - colour).sum(-1) < 10).sum() > 500
