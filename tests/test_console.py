"""The console page in a real headless Chromium against a real uvicorn on loopback: it renders
the fitted ROI and its heatmaps, and loads nothing from anywhere else (network log checked).

Chromium comes from Debian's ``chromium`` package; the set-up installs it when absent and the
tests skip, saying why, only where it cannot be installed. The screenshot is kept in the test's
temporary folder (its path is printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.api import Engine
from http_compat.server import HttpServer
from tests.support import door_settings, load_bgr, png_bytes

SIDE, MM, ROLE, ROI = 224, 0.1, "top", "cap"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        # a fresh machine may have no package lists yet: then update them and try once more
        for command in (install, ["apt-get", "update"], install):
            subprocess.run(command, capture_output=True, timeout=600, check=False,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if command is install and shutil.which("chromium"):
                break
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium is not installed and apt-get could not install it: {exc}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` failed (no root or no mirror)")
    return found


@pytest.fixture(scope="module")
def served(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, str]]:
    config = door_settings(tmp_path_factory.mktemp("console"), input_size=112, history_flush_interval_s=0.05)
    engine = Engine(config.engine)
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))
    broken = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))
    fit = engine.fit_ok(ROLE, ROI, MM, [png_bytes(load_bgr(p, SIDE)) for p in train[:6]])
    ng = [engine.infer(ROLE, ROI, MM, png_bytes(load_bgr(p, SIDE)), allow_uncalibrated=True).score
          for p in broken[:2]]
    engine.calibrate_ng(ROLE, ROI, MM, list(fit.ok_scores), ng)
    for path in [*train[6:9], *broken[2:4]]:
        engine.infer(ROLE, ROI, MM, png_bytes(load_bgr(path, SIDE)), operator_id="tester")
    engine.monitor.flush()
    server = HttpServer(engine, config.http)
    server.start()
    yield engine, server.url
    server.stop(timeout=2)
    engine.close()


def _requests(netlog: Path) -> set[tuple[str, str]]:
    """(url, initiator) of every request Chromium started, from its network log."""
    text = netlog.read_text(encoding="utf-8", errors="replace").rstrip()
    try:
        log = json.loads(text)
    except ValueError:                                  # cut short at exit: close the event list
        log = json.loads(text.rstrip(",") + "]}")
    return {(e["params"]["url"], e["params"]["initiator"]) for e in log["events"]
            if "url" in e.get("params", {}) and "initiator" in e["params"]}


def _headless(chromium: str, url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    host = httpx.URL(url).host
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {host}", "--window-size=1280,1800", *flags, url],
        capture_output=True, text=True, timeout=120, check=False)


def test_the_console_renders_the_roi_and_its_heatmaps_offline(served: tuple[Engine, str], tmp_path: Path) -> None:
    chromium = _chromium()
    _, url = served
    netlog = tmp_path / "netlog.json"
    dom = _headless(chromium, f"{url}/console", "--dump-dom", f"--log-net-log={netlog}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f'data-roi="{ROI}"' in html and f"{ROLE} / {ROI}" in html and "version 1" in html
    heatmaps = re.findall(r'<img class="heatmap"[^>]*src="data:image/png;base64,', html)
    assert len(heatmaps) == 7                 # 2 raw scorings before calibration, 5 inspections after
    assert 'class="histogram"' in html and 'class="drift-chart"' in html and 'class="region"' in html
    assert not re.search(r"https?://", html), "the page names an external URL"
    started = _requests(netlog)
    assert (f"{url}/console", "not an origin") in started                     # the navigation itself
    # everything the page asked for (the browser's own background calls have no page origin)
    by_page = sorted(u for u, initiator in started if initiator == url)
    assert all(u.startswith(f"{url}/") for u in by_page), by_page
    shot = tmp_path / "console.png"
    result = _headless(chromium, f"{url}/console", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    print(f"console screenshot: {shot}")


def test_the_console_html_names_no_other_host(served: tuple[Engine, str]) -> None:
    _, url = served
    r = httpx.get(f"{url}/console", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", r.text) and "<script" not in r.text
    assert r.headers.get("x-request-id")


def test_the_console_follows_the_api_key_rule(served: tuple[Engine, str], tmp_path: Path) -> None:
    engine, _ = served
    config = door_settings(tmp_path, api_key="secret-key")
    server = HttpServer(engine, config.http)
    server.start()
    try:
        refused = httpx.get(f"{server.url}/console", timeout=30)
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        allowed = httpx.get(f"{server.url}/console", headers={"X-API-Key": "secret-key"}, timeout=30)
        assert allowed.status_code == 200 and f'data-roi="{ROI}"' in allowed.text
    finally:
        server.stop(timeout=2)
