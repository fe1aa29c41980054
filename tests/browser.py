"""Debian's headless Chromium for the browser tests, found and started one way.

``bin/dev test`` installs ``chromium`` and ``chromium-driver`` (Debian's
packages: nothing downloads a browser). :func:`chrome` drives it through
selenium with both paths given, so selenium never looks for (or fetches) a
driver of its own; :data:`needs_chromium` skips a test on a box without them.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

__all__ = ["CHROMIUM", "CHROMEDRIVER", "needs_chromium", "chrome"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="no chromium and chromium-driver here (bin/dev test installs them)")


def chrome(profile: str, width: int = 1200, height: int = 900) -> Any:
    """A selenium WebDriver on headless Chromium with a *width* x *height* window."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox: the tests run as root. Its own profile: nothing left from another run.
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 "--disable-background-networking", "--disable-component-update"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver
