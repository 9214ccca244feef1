"""``munet report`` in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

``scripts/install.sh --test`` installs both; without them the test is skipped with the reason.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import make_run

from munet.reporting.report import write_report

pytestmark = pytest.mark.browser


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: run scripts/install.sh --test (Debian package chromium)")
    return path


def test_report_renders_in_chromium(tmp_path, one_thread):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: run scripts/install.sh --test")
    run_dir = tmp_path / "run"
    make_run(run_dir)
    page_file = write_report(run_dir)
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            # the page must need nothing but itself: any request that is not the file or an inline image fails
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                       else (problems.append(f"request {route.request.url}"), route.abort()))
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => ({id: i.id, ok: i.complete, "
                                   "w: i.naturalWidth, shown: i.getBoundingClientRect().width}))")
            rows = page.locator("#task-table tbody tr").all_inner_texts()
            heading = page.locator("h1").inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert heading == "munet report"
    assert [r.split("\t")[0] for r in rows] == ["a", "b", "average"]
    assert {i["id"] for i in images} >= {"fig-system", "fig-progress", "fig-quality", "fig-mutations"}
    for image in images:  # loaded, decoded, and laid out within the page's width
        assert image["ok"] and image["w"] > 300 and 300 < image["shown"] <= 1280, image
    assert (tmp_path / "report.png").stat().st_size > 50_000
