"""The HTML report: self-contained, its plots present and drawn when a browser renders it
(headless Chromium), and the Pareto front marks exactly the points nothing beats."""

import re
import shutil
import subprocess

import pytest

from tests.helpers import random_tiny
from tuili.pipeline import QuantizeStage, optimize
from tuili.pipeline.html_report import pareto_front, render_html, write_report


def test_pareto_front_keeps_only_points_nothing_beats():
    #            small, bad   mid, good   big, best   mid, worse than (mid, good)
    points = [(100.0, 20.0), (200.0, 15.0), (400.0, 14.0), (250.0, 16.0)]
    assert pareto_front(points) == [0, 1, 2]
    # speed: larger is better; (300, 15) beats (200, 15.5) on both
    assert pareto_front([(100.0, 14.0), (200.0, 15.5), (300.0, 15.0)], larger_is_better=True) == [0, 2]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # ties beat nothing


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    text = tmp_path_factory.mktemp("data") / "t.txt"
    text.write_text("the report renders in a browser " * 300)
    return optimize(
        random_tiny(),
        [QuantizeStage("w8a16")],
        data=str(text),
        seq_len=64,
        max_tokens=1024,
        progress=False,
    )


def test_report_is_self_contained_with_tables_and_three_plots(report, tmp_path):
    page, summary = write_report(report, tmp_path / "out")
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and summary.read_text() == report.to_markdown()
    assert len(re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,', html)) == 3
    assert not re.search(r'(src|href)="(https?:|//|/)', html)  # nothing fetched from elsewhere
    assert "quantize w8a16 rtn" in html and "Most sensitive layers" in html and "<h2>Analysis</h2>" in html
    assert len(report.sensitivity) == 15  # 2 layers × 7 linear layers + the head


def test_report_renders_in_headless_chromium_with_its_plots_drawn(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed to check the report renders: `make test` installs Debian's chromium"
    page = tmp_path / "page.html"
    # after load, record how many plots the browser decoded and drew at a real size
    probe = (
        "<script>addEventListener('load', () => { const ok = [...document.images].filter("
        "i => i.complete && i.naturalWidth > 200 && i.getBoundingClientRect().width > 200).length;"
        " document.body.setAttribute('data-plots-drawn', ok); });</script>"
    )
    page.write_text(render_html(report).replace("</body>", probe + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-plots-drawn="3"' in dom, dom[:500]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 20_000  # a page of tables and plots, not a blank one
