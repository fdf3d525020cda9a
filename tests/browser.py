"""Headless Debian Chromium driven by Playwright; skipped locally when absent, required in CI."""
import os
import shutil

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = os.environ.get("BUSI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    if not path:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and the playwright package (.ci/run installs both)")
        pytest.skip("chromium or playwright not installed")
    return path
