"""Class samplers for HF-Softmax: which classes a minibatch's softmax runs over.

Backends (``build_sampler(name, ...)``): ``annoy`` (the paper's hashing forest, default),
``hnsw`` (hnswlib), ``faiss`` (IVF-Flat, or HNSW), ``exact`` (chunked torch matmul + top-k)
and ``random`` (Partial FC's uniform negatives). See ``base.py`` for the interface, the
metric handling and the background rebuild, ``selection.py`` for the rule, and
``README.md`` in this folder for the measured recall and speed. ``process=True`` runs the
index in its own process (``process.py``).

>>> from hfsoftmax.samplers import build_sampler
>>> sampler = build_sampler("annoy", num_classes, dim, metric="cosine", interval=100)
>>> sampler.maybe_rebuild(step, rowstore.read_all)
>>> class_ids, remapped_labels = sampler.select(features, labels, sample_num=1000)
"""
from .base import METRICS, ClassSampler
from .registry import DEFAULT_SAMPLER, build_sampler, list_samplers, register_sampler
from .process import IndexProcessError, NpyRowSource, ProcessSampler
from .selection import select_classes
from .telemetry import recall_of_true_topk

__all__ = ["ClassSampler", "METRICS", "DEFAULT_SAMPLER", "build_sampler", "list_samplers",
           "register_sampler", "select_classes", "recall_of_true_topk", "ProcessSampler",
           "NpyRowSource", "IndexProcessError"]
