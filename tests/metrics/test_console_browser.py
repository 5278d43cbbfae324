"""The console in a real headless Chromium: sign in, live numbers move, the inspector finds
a customer, the funnel shows a rule that fired. Needs Debian's chromium and chromium-driver."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import httpx
import pytest

from engine.api import create_app
from engine.clock import ManualClock
from engine.config import load
from tests.chromium import chromium
from tests.conftest import ROOT, LocalShards, serve_app, test_config

WRITE = ("dev-write-key", "")
MORNING = datetime(2026, 11, 18, 10, 0, tzinfo=UTC).timestamp()

pytestmark = pytest.mark.slow


def text_of(driver, element_id: str) -> str:
    """The element's text; "" while it is not there (the page is still loading)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.ID, element_id).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def wait_text(driver, element_id: str, predicate, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = text_of(driver, element_id)
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"#{element_id} still shows {text!r}")
        time.sleep(0.1)


def at(seconds: float) -> str:
    return datetime.fromtimestamp(MORNING + seconds, UTC).isoformat()


def test_console_in_headless_chromium(redis_url: str) -> None:
    from selenium.webdriver.common.by import By

    rules = load(ROOT / "config.toml", env={}).rules
    config = dataclasses.replace(test_config(), rules=rules)
    clock = ManualClock(MORNING)
    shards = LocalShards(config, redis_url, clock)
    with (
        serve_app(create_app(config, redis_url, shards.connect)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
        chromium() as driver,
    ):
        driver.get(base + "/console")
        assert driver.find_element(By.ID, "login")  # not signed in: the form
        driver.find_element(By.ID, "key").send_keys("dev-write-key")
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_text(driver, "login-error", lambda t: "not an admin key" in t)
        driver.find_element(By.ID, "key").send_keys("dev-admin-key")
        driver.find_element(By.CSS_SELECTOR, "#login button").click()

        first = int(wait_text(driver, "total-accepted", str.isdigit))
        assert len(driver.find_elements(By.CSS_SELECTOR, ".uplot")) == 3  # the charts drew

        batch = [
            {
                "type": "track",
                "userId": "ann" if i == 0 else f"shopper-{i}",
                "event": "Product Added" if i == 0 else "Product Viewed",
                "timestamp": at(0),
                "properties": {"product_id": "sku-1", "name": "Wool socks", "price": 9.5},
            }
            for i in range(25)
        ]
        assert client.post("/v1/batch", auth=WRITE, json={"batch": batch}).status_code == 200
        wait_text(driver, "total-accepted", lambda t: t.isdigit() and int(t) >= first + 25)
        wait_text(driver, "total-applied", lambda t: t.isdigit() and int(t) >= 25)
        wait_text(driver, "rate-accepted", lambda t: t not in ("", "\u2013"))
        assert int(wait_text(driver, "profiles", str.isdigit)) >= 25

        clock.advance(16 * 60)  # ann's cart reminder falls due
        wait_text(driver, "total-triggers", lambda t: t.isdigit() and int(t) >= 1)
        table = driver.find_element(By.CSS_SELECTOR, "#funnel")
        deadline = time.monotonic() + 15
        while "cart_abandonment" not in table.text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "cart_abandonment" in table.text

        driver.find_element(By.ID, "customer").send_keys("ann")
        driver.find_element(By.CSS_SELECTOR, "#inspect button").click()
        assert wait_text(driver, "inspect-id", lambda t: t == "ann")
        assert "Wool socks" in text_of(driver, "inspect-profile")
        sends = driver.find_element(By.ID, "inspect-sends").text
        assert "cart_abandonment" in sends

        driver.find_element(By.ID, "customer").clear()
        driver.find_element(By.ID, "customer").send_keys("nobody-at-all")
        driver.find_element(By.CSS_SELECTOR, "#inspect button").click()
        assert "no customer" in wait_text(driver, "inspect-error", bool)
        errors = [
            e for e in driver.get_log("browser") if e["level"] == "SEVERE"
        ]  # fmt: skip
        # the refused login (401) and the failed lookup (404) are expected; nothing else
        expected = ("/console/login - Failed to load resource", "nobody-at-all")
        unexpected = [e for e in errors if not any(x in e["message"] for x in expected)]
        assert not unexpected, errors
