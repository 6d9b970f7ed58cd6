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


@pytest.fixture(scope="session")
def tiny_rec(tmp_path_factory) -> str:
    """The trainer tests' small set, made once per session: 40 identities x 4 images
    (seed 1; a batch of 16 makes 10 steps an epoch). Read-only: tests write elsewhere.
    A module that needs another size defines its own ``tiny_rec``."""
    from tests.train_data import make_tiny_rec

    return make_tiny_rec(tmp_path_factory.mktemp("data") / "tiny", num_classes=40,
                         per_class=4, seed=1)


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
