"""report.html in a real browser (headless Chromium): it renders, and nothing overflows the window
sideways, at a desktop and at a narrow width, with a table wider than the page.

Skips, saying why, where Chromium is not installed (``.ci/run`` installs it from Debian packages).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_report import KEYS, metrics, predictions, real, screen  # noqa: F401  (module fixtures, used by name)

from perturbdiff_core.evaluation.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it)"
)

#: Flags for a quiet, isolated headless run (no network, no profile, no GPU, no sandbox in containers).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)

#: Appended to a copy of the page: after load, records the page's width against the window's and
#: every element sticking out on the right that is not inside a sideways-scrolling box.
CHECK = """<script>
window.addEventListener('load', () => {
  const width = window.innerWidth, over = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.getBoundingClientRect().right > width + 1 && !el.parentElement.closest('.scroll')) {
      over.push(el.tagName.toLowerCase() + (el.className ? '.' + el.className : ''));
    }
  }
  const out = document.createElement('pre');
  out.id = 'overflow-check';
  out.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth, innerWidth: width, over: over});
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180
    )


def _overflow(page: Path, width: int, profile: Path) -> dict:
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    done = _chromium("--dump-dom", "--virtual-time-budget=10000", f"--window-size={width},2000", probe.as_uri(), profile=profile)
    found = re.search(r"<pre id=\"overflow-check\">(.*?)</pre>", done.stdout, re.S)
    assert found, f"the check did not run; chromium said: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory, metrics, predictions, real) -> Path:  # noqa: F811
    """A report with twelve methods, so its table is wider than a narrow window."""
    names = [f"baseline_with_a_long_name_{k}" for k in range(8)]
    many = dict(predictions) | dict.fromkeys(names, predictions["control"])
    copies = [metrics[metrics.method == "control"].assign(method=name) for name in names]
    table = pd.concat([metrics, *copies], ignore_index=True)
    table.attrs = metrics.attrs
    folder = tmp_path_factory.mktemp("browser")
    return write_report(folder, table, predictions=many, real=real, **KEYS, run_info={"data": "/a/long/path/" * 12})


def test_the_report_renders_to_a_screenshot(wide_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1400,3000", wide_report.as_uri(), profile=tmp_path / "profile")
    assert shot.is_file(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page with plots, not a blank one
    assert struct.unpack(">II", data[16:24]) == (1400, 3000)


@pytest.mark.parametrize("width", [1400, 700])
def test_nothing_overflows_the_window_sideways(wide_report: Path, tmp_path: Path, width: int) -> None:
    check = _overflow(wide_report, width, tmp_path / "profile")
    assert check["innerWidth"] == width
    assert check["over"] == [] and check["scrollWidth"] <= width, check
