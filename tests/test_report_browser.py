"""The HTML report in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven through selenium) loads the page from file://, and every table,
image and inline SVG must render, with no request leaving the page.

Also a helper: ``python tests/test_report_browser.py REPORT.html SHOT.png`` checks a report
and saves a full-page screenshot.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1400,1000")

# What the page holds, as the browser sees it (rendered sizes, load state of each image).
PAGE_STATE = """
const box = e => e.getBoundingClientRect();
return {
  sections: Array.from(document.querySelectorAll('section.bench')).map(s => ({
    bench: s.dataset.bench,
    tables: Array.from(s.querySelectorAll('table.leaderboard')).map(t => ({
      rows: t.querySelectorAll('tr').length, height: box(t).height,
      cells: Array.from(t.querySelectorAll('td')).filter(td => td.textContent.trim()).length})),
    svgs: Array.from(s.querySelectorAll('.figure svg')).map(v => ({width: box(v).width, height: box(v).height,
      texts: v.querySelectorAll('text').length})),
  })),
  images: Array.from(document.images).map(i => ({complete: i.complete, natural: i.naturalWidth,
    width: box(i).width, src: i.src.slice(0, 30)})),
  resources: performance.getEntriesByType('resource').map(r => r.name),
  height: document.documentElement.scrollHeight,
};
"""


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is absent: install the Debian package {package} (`apt-get install -y chromium " \
                   "chromium-driver`; .ci/run does this in CI)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def start_chromium(profile: Path) -> Any:
    """A headless Chromium session (selenium + the system chromedriver; no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look anything up online
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))


def load(driver: Any, page: Path, timeout: float = 20) -> dict[str, Any]:
    """Open ``page`` from a file:// URL, wait until it and its images have loaded; the
    page state, every URL the browser requested, and the console's errors."""
    import json

    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_page_load_timeout(timeout)
    driver.get_log("performance")  # drop what the start page (chrome://new-tab-page) requested
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    state = driver.execute_script(PAGE_STATE)
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    state["requests"] = [  # every request, except those of the browser's own pages (chrome://new-tab-page)
        e["params"]["request"]["url"] for e in events
        if e["method"] == "Network.requestWillBeSent" and not e["params"].get("documentURL", "").startswith("chrome")
        and not e["params"]["request"]["url"].startswith("chrome")
    ]
    state["errors"] = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return state


def screenshot(driver: Any) -> bytes:
    """A PNG of the whole page (beyond the window), through the DevTools protocol."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True, "clip": clip})
    return base64.b64decode(shot["data"])


@pytest.fixture
def browser(tmp_path: Path):
    why = browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    driver = start_chromium(tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_chromium(tmp_path: Path, toy_plugin: Path, browser: Any) -> None:
    from tests.conftest import make_bench, run_bmad  # here: the module also runs as a script (see the top)

    toy = make_bench(tmp_path / "data" / "Toy", n_test=(4, 6))
    plain = make_bench(tmp_path / "data" / "Plain", n_test=(4, 6), seed=1)
    for d in plain.glob("*/Ungood/anomaly_mask"):
        shutil.rmtree(d)
    results = tmp_path / "results"
    common = ("--seeds", "2", "--results", str(results), "--no-progress")
    for extra in ([], ["--param", "noise=0.05"]):  # two configs of toy on Toy, one on Plain
        benches = f"folder:{toy}" + ("" if extra else f",folder:{plain}")
        p = run_bmad("run", "--algo", "toy", "--bench", benches, *common, *extra, plugin=toy_plugin)
        assert p.returncode == 0, p.stderr
    page = tmp_path / "report.html"
    p = run_bmad("report", "--results", str(results), "--out", str(page))
    assert p.returncode == 0, p.stderr

    state = load(browser, page)
    png = screenshot(browser)
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("BMAD_SCREENSHOT_DIR"):
        keep = Path(os.environ["BMAD_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "report_browser_test.png").write_bytes(png)

    sections = {s["bench"]: s for s in state["sections"]}
    assert set(sections) == {"folder-Toy", "folder-Plain"}
    for bench, n_configs in (("folder-Toy", 2), ("folder-Plain", 1)):
        tables = sections[bench]["tables"]
        assert len(tables) == 2  # the leaderboard, and significance + efficiency
        for table in tables:
            assert table["rows"] == 1 + n_configs and table["height"] > 20
            assert table["cells"] >= n_configs * 3  # label, seeds, metrics: rendered, not empty
        (svg,) = sections[bench]["svgs"]
        assert svg["width"] > 300 and svg["height"] > 200 and svg["texts"] > 5  # the efficiency plot, drawn
    assert len(state["images"]) == 2  # one map grid per bench
    for img in state["images"]:
        assert img["complete"] and img["natural"] > 0 and img["width"] > 100, img
        assert img["src"].startswith("data:image/png;base64,")
    external = [u for u in state["requests"] + state["resources"] if not u.startswith(("file://", "data:"))]
    assert not external
    assert any(u.startswith("file://") for u in state["requests"])  # the log did record the page itself
    assert not state["errors"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/test_report_browser.py REPORT.html SHOT.png")
    if why := browser_missing():
        sys.exit(why)
    with tempfile.TemporaryDirectory() as profile:
        drv = start_chromium(Path(profile))
        try:
            found = load(drv, Path(sys.argv[1]))
            Path(sys.argv[2]).write_bytes(screenshot(drv))
        finally:
            drv.quit()
    for s in found["sections"]:
        print(f"{s['bench']}: tables {[t['rows'] for t in s['tables']]} rows, svgs {len(s['svgs'])}")
    print(f"images: {[(i['complete'], i['natural']) for i in found['images']]}")
    print(f"external requests: {[u for u in found['requests'] if not u.startswith(('file://', 'data:'))]}")
    print(f"console errors: {found['errors']}")
    print(f"wrote {sys.argv[2]}")
