"""A small registry of class samplers (as torchvision's ``models/_api.py``).

Backends with optional dependencies register a factory that imports their module (and the
library) only when built, so ``import hfsoftmax.samplers`` never imports annoy/hnswlib/faiss.
"""
from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["register_sampler", "build_sampler", "list_samplers", "DEFAULT_SAMPLER"]

DEFAULT_SAMPLER = "annoy"  # the paper's hashing forest
_SAMPLERS: dict[str, Callable] = {}


def register_sampler(name: str, factory: Callable | None = None):
    """Register ``factory(num_classes, dim, **opts) -> ClassSampler`` under ``name``.

    Usable as a decorator (``@register_sampler("mine")``). Raises ValueError on a duplicate.
    """
    def add(f):
        if name in _SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        _SAMPLERS[name] = f
        return f
    return add if factory is None else add(factory)


def list_samplers() -> list[str]:
    """Names accepted by :func:`build_sampler`, sorted."""
    return sorted(_SAMPLERS)


def build_sampler(name: str, num_classes: int, dim: int, *, metric: str = "ip", seed: int = 0,
                  process: bool = False, **backend_opts):
    """Build the class sampler ``name`` (``annoy``, ``hnsw``, ``faiss``, ``exact``, ``random``).

    ``metric`` must match the head's logits: ``"ip"`` for the linear head, ``"cosine"`` for
    the margin heads. Common options: ``interval`` (rebuild period in steps),
    ``background``; backend options are documented on each class.

    ``process=True`` runs the index in its own process
    (:class:`~hfsoftmax.samplers.process.ProcessSampler`: the trainer then never holds the
    index, and with a remote row store not the rows either; extra options ``row_source``,
    ``threads``, ``timeout_s``). The ``random`` sampler keeps no index and stays in-process.

    >>> sampler = build_sampler("annoy", 100_000, 256, metric="cosine", ntrees=50)
    """
    try:
        factory = _SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: "
                         f"{', '.join(list_samplers())}") from None
    if process and name != "random":
        from .process import ProcessSampler
        return ProcessSampler(name, num_classes, dim, metric=metric, seed=seed, **backend_opts)
    if process:  # no index to move: drop the process-only options
        for key in ("row_source", "threads", "timeout_s", "start_timeout_s", "tmp_dir"):
            backend_opts.pop(key, None)
    return factory(num_classes, dim, metric=metric, seed=seed, **backend_opts)


def _lazy(module: str, cls: str, package: str, pip_name: str) -> Callable:
    """A factory importing ``module`` on first use, with a pip hint if ``package`` is missing."""
    def factory(num_classes, dim, **opts):
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ImportError(f"the {cls} sampler needs the '{package}' package: "
                              f"pip install {pip_name}") from exc
        mod = importlib.import_module(module, __package__)
        return getattr(mod, cls)(num_classes, dim, **opts)
    factory.__name__ = f"build_{cls}"
    return factory


register_sampler("exact", _lazy(".exact", "ExactSampler", "torch", "torch"))
register_sampler("random", _lazy(".uniform", "RandomSampler", "numpy", "numpy"))
register_sampler("annoy", _lazy(".annoy_forest", "AnnoySampler", "annoy", "annoy"))
register_sampler("hnsw", _lazy(".hnsw", "HnswSampler", "hnswlib", "hnswlib"))
register_sampler("faiss", _lazy(".faiss_index", "FaissSampler", "faiss", "faiss-cpu"))
