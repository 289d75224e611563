"""The real-browser harness (tests/browser.py): Chromium loads a page on the broker's origin that imports the
JavaScript client from ``/client/broker.js``, and where no Chromium is installed the tests say so loudly.

Given a broker process and the session's headless Chromium
When a page is opened on the broker's origin
Then the client module is imported from the broker, connects over the browser's own WebSocket and pings; the page's
     screenshot is saved when the test ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import browser as harness
from .brokers import BrokerProcess
from .browser import BROWSER, Pages


@BROWSER
async def test_a_page_on_the_broker_origin_imports_the_client_and_connects(
    broker: BrokerProcess, pages: Pages
) -> None:
    page = await pages.open(broker.http)
    result = await page.evaluate(
        """async () => {
            const c = await broker.connect(wsUrl);
            await c.ping();
            const state = c.state;
            await c.close();
            return {state, origin: location.origin, classes: typeof broker.BrokerError};
        }"""
    )
    assert result == {"state": "open", "origin": broker.http, "classes": "function"}
    shot = await pages.screenshot(page, "-connected")
    assert shot.stat().st_size > 0
    page.check()


def test_no_chromium_is_a_loud_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(harness, "CHROMIUM", tmp_path / "no-chromium")
    reason = harness.chromium_missing()
    assert reason is not None and reason.startswith("BROWSER TESTS SKIPPED") and "no-chromium" in reason
