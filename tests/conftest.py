"""Shared test fixtures: paths, and loud skipping of GPU tests on CPU-only machines."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Files written by real MXNet and Python 2 (never edited); CI has shared/ beside the checkout.
SHARED_FIXTURES = Path(os.environ.get("HFSOFTMAX_SHARED_FIXTURES",
                                      ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The folder of ecosystem-written fixtures; a missing folder is an error, not a skip."""
    if not SHARED_FIXTURES.is_dir():
        raise FileNotFoundError(f"shared fixtures not found at {SHARED_FIXTURES}; set "
                                "HFSOFTMAX_SHARED_FIXTURES to the shared/fixtures folder")
    return SHARED_FIXTURES


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests either way
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="GPU test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
