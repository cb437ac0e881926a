"""Where the real datasets live for tests: ../shared/data beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.convert import DEFAULT_SHARED


def shared_data() -> Path:
    """The shared data folder; skips loudly (fails under CI=true) when it is absent."""
    if DEFAULT_SHARED.is_dir():
        return DEFAULT_SHARED
    message = f"REAL DATA NOT TESTED: {DEFAULT_SHARED} is missing (clone the repo beside ../shared)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
