"""Helpers for the tests of the scripts in benchmarks/ (a folder of scripts, not a package)."""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
