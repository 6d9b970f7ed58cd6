"""Class samplers for HF-Softmax: which classes a minibatch's softmax runs over.

Backends (``build_sampler(name, ...)``): ``annoy`` (the paper's hashing forest, default),
``hnsw`` (hnswlib), ``faiss`` (IVF-Flat, or HNSW), ``exact`` (chunked torch matmul + top-k),
``device`` (exact top-k over a copy of the rows on the features' device, updated in place
with every changed row: ``device.py``, ``device_rows.py``) and ``random`` (Partial FC's
uniform negatives). The pieces: ``index.py`` (what a backend
implements: metric preparation, build, search), ``handle.py`` (the index kept in this
process, rebuilt in the background and swapped atomically), ``process.py`` (the same handle
proxied to an index process), ``selector.py`` (the sampler: rebuild policy, fresh rows, the
selection rule of ``selection.py``, telemetry). ``README.md`` in this folder has the
measured recall and speed.

>>> from hfsoftmax.samplers import build_sampler
>>> sampler = build_sampler("annoy", num_classes, dim, metric="cosine", interval=100)
>>> sampler.maybe_rebuild(step, rowstore.read_all)
>>> class_ids, remapped_labels = sampler.select(features, labels, sample_num=1000)
"""
from .handle import IndexHandle, IndexStatus
from .index import METRICS, Index
from .process import IndexProcessError, NpyRowSource, ProcessIndexHandle, ProcessSampler
from .registry import (DEFAULT_SAMPLER, build_index, build_sampler, index_backends,
                       list_samplers, register_sampler)
from .selection import select_classes
from .selector import ClassSampler
from .telemetry import recall_of_true_topk

__all__ = ["ClassSampler", "METRICS", "DEFAULT_SAMPLER", "build_sampler", "list_samplers",
           "register_sampler", "select_classes", "recall_of_true_topk", "ProcessSampler",
           "NpyRowSource", "IndexProcessError", "Index", "IndexHandle", "IndexStatus",
           "ProcessIndexHandle", "build_index", "index_backends"]
