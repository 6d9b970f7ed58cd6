"""Pieces of the training loop, one concept per module: ``config`` (every flag and its
default), ``data`` (deterministic sharded batch order), ``schedule`` (learning rate),
``metrics`` (progress line, CSV, TensorBoard), ``checkpoint`` (atomic save, weights-only
load). The loop itself is in :mod:`hfsoftmax.train`."""
