"""A small registry of class samplers (as torchvision's ``models/_api.py``).

Two tables: the samplers :func:`build_sampler` makes (``register_sampler``), and the index
backends among them (annoy, hnsw, faiss, exact), which :func:`build_index` makes on their own
for an index process. Backends with optional dependencies register a factory that imports
their module (and the library) only when built, so ``import hfsoftmax.samplers`` never
imports annoy/hnswlib/faiss.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

__all__ = ["register_sampler", "build_sampler", "list_samplers", "build_index",
           "index_backends", "DEFAULT_SAMPLER", "POLICY_OPTIONS", "PROCESS_OPTIONS",
           "IN_TRAINER"]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLER = "annoy"  # the paper's hashing forest
#: options of the sampler itself (the selector), not of its index backend
POLICY_OPTIONS = ("interval", "background", "neighbour_oversample", "random_share",
                  "fresh_rows")
#: options of an index process (``process=True``), not of its backend
PROCESS_OPTIONS = ("row_source", "threads", "timeout_s", "start_timeout_s", "tmp_dir")
#: samplers that always run in the trainer: ``random`` keeps no index, ``device`` keeps its
#: copy of the rows on the accelerator; ``process=True`` drops the process options for them
IN_TRAINER = ("random", "device")
_SAMPLERS: dict[str, Callable] = {}
_INDEXES: dict[str, Callable] = {}


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


def index_backends() -> list[str]:
    """Names of the samplers that select by an index (those ``process=True`` can move to an
    index process), sorted."""
    return sorted(_INDEXES)


def build_index(name: str, num_classes: int, dim: int, **opts):
    """The :class:`~hfsoftmax.samplers.index.Index` backend ``name`` (``metric``, ``mips``,
    ``seed`` and the backend's own options); what an index process serves."""
    try:
        factory = _INDEXES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown index backend {name!r}. Valid: "
                         f"{', '.join(index_backends())}") from None
    return factory(num_classes, dim, **opts)


def build_sampler(name: str, num_classes: int, dim: int, *, metric: str = "ip", seed: int = 0,
                  process: bool = False, **backend_opts):
    """Build the class sampler ``name`` (``annoy``, ``hnsw``, ``faiss``, ``exact``, ``device``,
    ``random``).

    ``metric`` must match the head's logits: ``"ip"`` for the linear head, ``"cosine"`` for
    the margin heads. Common options: ``interval`` (rebuild period in steps),
    ``background``, ``random_share``, ``fresh_rows``; backend options are documented on
    each backend's class (an unknown one raises TypeError).

    ``process=True`` runs the index in its own process
    (:class:`~hfsoftmax.samplers.process.ProcessSampler`: the trainer then never holds the
    index, and with a remote row store not the rows either; extra options ``row_source``,
    ``threads``, ``timeout_s``). The ``random`` sampler keeps no index and the ``device``
    sampler keeps its copy of the rows on the accelerator: both stay in the trainer.

    >>> sampler = build_sampler("annoy", 100_000, 256, metric="cosine", ntrees=50)
    """
    try:
        factory = _SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: "
                         f"{', '.join(list_samplers())}") from None
    if process and name not in IN_TRAINER:
        from .process import ProcessSampler
        return ProcessSampler(name, num_classes, dim, metric=metric, seed=seed, **backend_opts)
    if process:  # no index to move: drop the process-only options
        if name == "device":
            logger.info(
                "the device sampler keeps its copy of the rows on the accelerator, in the "
                "trainer: process=True has no effect on it")
        for key in PROCESS_OPTIONS:
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


def _register_index(name: str, module: str, cls: str, package: str, pip_name: str) -> None:
    """Register the index backend ``cls`` and the sampler selecting by it in this process."""
    make_index = _lazy(module, cls, package, pip_name)
    _INDEXES[name] = make_index

    def factory(num_classes, dim, *, metric="ip", seed=0, **opts):
        from .selector import ClassSampler, check_policy
        policy = {k: opts.pop(k) for k in POLICY_OPTIONS if k in opts}
        check_policy(**policy)  # before the backend imports its library
        index = make_index(num_classes, dim, metric=metric, seed=seed, **opts)
        return ClassSampler(num_classes, dim, metric=metric, seed=seed, index=index, **policy)
    factory.__name__ = f"build_{name}_sampler"
    register_sampler(name, factory)


_register_index("exact", ".exact", "ExactIndex", "torch", "torch")
_register_index("annoy", ".annoy_forest", "AnnoyForest", "annoy", "annoy")
_register_index("hnsw", ".hnsw", "HnswIndex", "hnswlib", "hnswlib")
_register_index("faiss", ".faiss_index", "FaissIndex", "faiss", "faiss-cpu")
register_sampler("random", _lazy(".uniform", "RandomSampler", "numpy", "numpy"))
# exact selection over a copy of the rows on the features' device (the GPU's default)
register_sampler("device", _lazy(".device", "DeviceSampler", "torch", "torch"))
