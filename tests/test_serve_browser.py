"""The live page in a real browser: headless Debian Chromium driven by Playwright against `tiny` on the CPU.

The page loads and shows frames that change; holding D turns the camera poses the model receives
(checked on the server); the key-press-to-updated-frame latency the page measures is printed at the end of
the run ("measurements"); a second
visitor sees the busy page with its place in line and gets the world once the first tab closes. With
WM_JAX_SCREENSHOT=PATH the page is also saved as a PNG (docs/serve_page.png comes from this test).
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the playwright package (pip install playwright; the test extra has it)")
    if CHROMIUM is None:
        pytest.skip("the browser test needs Chromium (apt-get install chromium; .ci/run installs it where apt exists)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _wait(page, condition: str, timeout_s: float = 30.0):
    page.wait_for_function(condition, timeout=timeout_s * 1000)


def _yaw(pose) -> float:
    return float(np.degrees(np.arctan2(pose[0, 2], pose[2, 2])))


def test_the_page_streams_a_world_that_the_keys_steer(live_server, browser, record_measurement):
    server, base = live_server
    first = browser.new_page(viewport={"width": 1280, "height": 600})
    first.goto(base)
    _wait(first, "window.wm && window.wm.framesReceived >= 6")
    assert first.inner_text("#status") == "live"
    grab = "document.getElementById('screen').toDataURL('image/png')"
    before = first.evaluate(grab)
    _wait(first, "window.wm.framesReceived >= 14")
    assert first.evaluate(grab) != before, "the frames do not change"

    # hold D on the view: the poses the model receives turn right (server side)
    first.click("#view")
    turned_from = len(server.world.pose_log)
    first.keyboard.down("d")
    _wait(first, "window.wm.latencies.length >= 1")
    time.sleep(1.5)
    first.keyboard.up("d")
    yaws = [_yaw(poses[-1]) for poses in server.world.pose_log[turned_from - 1:]]
    turned = np.degrees(np.unwrap(np.radians(yaws)))
    assert turned[-1] > turned[0] + 3.0, turned
    latency_ms = first.evaluate("window.wm.latencies[0]")
    record_measurement(f"live page, tiny on this CPU: key press to first updated frame {latency_ms:.0f} ms")
    assert 0 < latency_ms < 20000
    hud = first.inner_text("#hud")
    assert "fps" in hud and "key→frame" in hud and "queue" in hud
    if os.environ.get("WM_JAX_SCREENSHOT"):
        first.screenshot(path=os.environ["WM_JAX_SCREENSHOT"])

    # a second visitor waits with its place in line; closing the first tab hands the world over
    second = browser.new_page(viewport={"width": 1280, "height": 600})
    second.goto(base)
    _wait(second, "document.getElementById('busy').style.display === 'flex'", 15)
    assert "number 1 in line" in second.inner_text("#busy")
    first.close()
    start = time.monotonic()
    _wait(second, "document.getElementById('status').textContent === 'live'", 10)
    assert time.monotonic() - start < 5.0
    _wait(second, "window.wm.framesReceived >= 3")
    second.close()
