"""Fixtures for every test folder: the real-browser harness (tests/browser.py: one Chromium per session)."""

pytest_plugins = ["tests.browser"]
