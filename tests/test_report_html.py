"""report.html in headless Chromium: the page loads from disk, every figure decodes and is shown,
and nothing is fetched (host resolution is disabled, and the page's resource timing is empty).

Needs Debian's `chromium` on PATH; skipped otherwise."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from synthetic import make_study

from loraplace.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless test needs `chromium` on PATH "
                                "(Debian: apt-get install -y chromium)")

# Appended to a copy of the page only: reports what the browser made of the images and which
# resources it requested, into the DOM that --dump-dom prints.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                                               shown: Math.round(i.getBoundingClientRect().width)}));
  const res = performance.getEntriesByType('resource').map(e => e.name);
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({imgs, res, tables: document.querySelectorAll('table').length,
                                  title: document.title});
  document.body.appendChild(p);
});</script>"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", "--window-size=1200,900", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("h") / "study", {"full": -0.3, "attention": -0.2, "ffn": -0.22},
                       seeds=(0, 1))
    return write_report([study], resamples=500)


def test_report_renders_in_headless_chromium(html, tmp_path):
    page = html.read_text()
    assert not re.search(r'(?:src|href)\s*=\s*"(?:https?:)?//', page), "external URL in report.html"
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    res = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"page did not load or the probe did not run: {res.stderr[-2000:]}"
    data = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert data["title"].startswith("LoRA placement report")
    assert len(data["imgs"]) == 6 and data["tables"] >= 5
    for img in data["imgs"]:
        assert img["ok"] and img["w"] > 1000 and img["h"] > 300, img  # decoded at 300 dpi
        assert img["shown"] > 300, img  # laid out at a readable width
    assert data["res"] == [], f"the page fetched resources: {data['res']}"


def test_report_screenshot_is_not_blank(html, tmp_path):
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", html.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text and figure pixels, not an empty page
