"""Prometheus's and Alertmanager's command-line tools from apt (prometheus,
prometheus-alertmanager): skipped where missing, a failure under CI, which installs them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def tool(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is missing (apt-get install prometheus prometheus-alertmanager)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(found)
