"""The HTML reports in a real browser: headless Chromium lays out the doctor's and the profiler's pages at 1400
and 800 px, and a script in a copy of each page measures what a reader would see: no table wider than its
container, no page that scrolls sideways, no table row taller than two lines (a number or a header broken over
lines), no image wider than the page. Screenshots are taken too; CNNPERF_SCREENSHOTS=DIR keeps them to look at.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it where it can); without it these tests skip,
saying so.
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import test_doctor_report as doctor_records
import test_profiler_report as profile_records

from cnnperf.doctor import report as doctor_report
from cnnperf.profiler import report as profile_report

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
WIDTHS = (1400, 800)
# Flags for a closed network and a root user: no sandbox, no background connections, a fresh profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")

# Runs after the page has loaded; writes its measurements into <pre id="layout"> for --dump-dom to show.
MEASURE = """<script>
window.addEventListener("load", () => {
  const out = {innerWidth: window.innerWidth, pageWidth: document.documentElement.scrollWidth, problems: []};
  document.querySelectorAll("div.scroll").forEach((div, i) => {
    if (div.scrollWidth > div.clientWidth + 1)
      out.problems.push(`table ${i} is ${div.scrollWidth} px wide in a ${div.clientWidth} px container`);
    div.querySelectorAll("tr:not(.noterow)").forEach((tr, j) => {
      const line = parseFloat(getComputedStyle(tr.cells[0]).lineHeight);
      const h = tr.getBoundingClientRect().height;
      if (h > 2.5 * line)  // two lines and the cell padding
        out.problems.push(`table ${i} row ${j} is ${h.toFixed(0)} px tall: more than two lines of ${line} px`);
    });
  });
  document.querySelectorAll("img").forEach((img, i) => {
    if (img.getBoundingClientRect().right > document.body.getBoundingClientRect().right + 1)
      out.problems.push(`image ${i} (${img.alt}) reaches past the page`);
  });
  out.tables = document.querySelectorAll("div.scroll").length;
  const pre = document.createElement("pre");
  pre.id = "layout";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120, check=False)


def _layout(page: str, width: int, folder: Path) -> dict:
    """The measurements of ``page`` (HTML text) laid out ``width`` px wide."""
    path = folder / f"measure_{width}.html"
    path.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    done = _chromium(f"--window-size={width},900", "--dump-dom", path.as_uri())
    dom = done.stdout
    assert '<pre id="layout">' in dom, f"Chromium printed no measurements (status {done.returncode}): {done.stderr}"
    return json.loads(dom.split('<pre id="layout">')[1].split("</pre>")[0])


def _screenshot(page_path: Path, width: int, png: Path) -> None:
    _chromium(f"--window-size={width},3000", f"--screenshot={png}", page_path.as_uri())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no screenshot of {page_path} at {width} px"


def _pages(folder: Path) -> dict[str, Path]:
    """The reports of the test records with the most in them (every column filled, long errors and reasons)."""
    failed = profile_records._minimal_record()
    failed["variants"] = [profile_records._variant("eager", "baseline", "failed", error="RuntimeError: boom " * 20)]
    records = {"profile_full": (profile_report, profile_records._full_record()),
               "profile_keep_eager": (profile_report, profile_records._keep_eager_record()),
               "profile_failed": (profile_report, failed),
               "doctor_full": (doctor_report, doctor_records._full_record())}
    pages = {}
    for name, (module, record) in records.items():
        pages[name] = module.render_html(record, folder / f"{name}.html")
    return pages


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return _pages(tmp_path_factory.mktemp("reports"))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["profile_full", "profile_keep_eager", "profile_failed", "doctor_full"])
def test_no_table_overflows_and_no_row_wraps(pages, name, width, tmp_path):
    page = pages[name].read_text(encoding="utf-8")
    layout = _layout(page, width, tmp_path)
    assert layout["innerWidth"] == width
    assert layout["tables"] >= 1
    assert layout["problems"] == [], f"{name} at {width} px"
    assert layout["pageWidth"] <= width, f"{name} at {width} px scrolls sideways"
    keep = os.environ.get("CNNPERF_SCREENSHOTS")
    folder = Path(keep) if keep else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    _screenshot(pages[name], width, folder / f"{name}_{width}.png")


def test_the_measurement_catches_an_overflowing_table(tmp_path):
    """The check itself can fail: a table of long unbreakable cells overflows at 800 px."""
    from cnnperf import reporting

    rows = [([("x" * 60, "") for _ in range(4)], "")]
    page = ("<!DOCTYPE html><html><head><style>" + reporting.CSS + "</style></head><body>"
            + "".join(reporting.html_table([(f"h{i}", "") for i in range(4)], rows)) + "</body></html>")
    problems = _layout(page, 800, tmp_path)["problems"]
    assert len(problems) == 1 and problems[0].startswith("table 0 is ")
