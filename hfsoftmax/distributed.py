"""Distributed helpers in one module (``torch.distributed``, launched by ``torchrun``).

Nothing here runs at import: :func:`init_distributed` reads torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``main()``
calls it. A world of one process needs no process group at all, so every helper below also
works, as the identity, in a plain ``python train.py`` run.

>>> init_distributed()          # no torchrun env: a no-op returning (rank 0, world 1)
(0, 1)
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_dist", "rank", "world_size", "local_rank", "is_main",
           "all_gather_tensor", "all_gather_sizes", "broadcast", "all_reduce_mean",
           "all_reduce", "barrier", "destroy_distributed"]

logger = logging.getLogger(__name__)


def is_dist() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """The rank within this host (torchrun's ``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0: the process that logs, writes checkpoints and plots."""
    return rank() == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0,
                     device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world)``.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised. ``backend``
    None follows ``device`` (this rank's resolved device): ``nccl`` for a GPU, ``gloo``
    otherwise, so ``--device cpu`` on a machine with GPUs runs gloo; without a device,
    ``nccl`` where CUDA is available. NCCL is refused for a CPU device (it moves only CUDA
    tensors). With NCCL the device is made current and passed to ``init_process_group`` as
    ``device_id`` (the communicator is bound to it at once, not guessed later).
    ``timeout_s``: how long a collective waits for the other ranks. Calling it again once
    initialised is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set; launch with "
                               "torchrun (or set RANK, MASTER_ADDR and MASTER_PORT)")
    if backend is None:
        if device is not None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
    valid = ("nccl", "gloo", "mpi")
    if backend not in valid:
        raise ValueError(f"unknown distributed backend {backend!r}; valid: {', '.join(valid)}")
    kwargs = {}
    if backend == "nccl":
        if device is not None and device.type != "cuda":
            raise ValueError(f"the nccl backend moves only CUDA tensors, and this rank's "
                             f"device is {device}; use gloo (--dist-backend gloo) or a GPU")
        device = device if device is not None else torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
        global _NCCL_DEVICE
        _NCCL_DEVICE = torch.device("cuda", torch.cuda.current_device())
    from datetime import timedelta

    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    logger.info("joined process group: rank %d of %d (%s, timeout %gs)", dist.get_rank(),
                dist.get_world_size(), backend, timeout_s)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    """Leave the process group, if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if is_dist():
        dist.barrier()


#: the CUDA device this rank's NCCL communicator is bound to (init_distributed): a
#: collective called from another thread (the row store's worker) must use it, not that
#: thread's current device (cuda:0 on a new thread)
_NCCL_DEVICE: torch.device | None = None


def _comm_device(t: torch.Tensor | None = None) -> torch.device:
    # gloo only moves CPU tensors; nccl only CUDA ones (this rank's bound device).
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    if _NCCL_DEVICE is not None:
        return _NCCL_DEVICE
    if t is not None and t.is_cuda:
        return t.device
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_tensor(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order (no autograd).

    Ranks may hold different numbers of rows (e.g. a short last batch): sizes are gathered
    first (or given: ``sizes``, every rank's row count, from :func:`all_gather_sizes`) and
    tensors padded to the largest. In a world of one, returns ``t`` itself.
    """
    if not is_dist():
        return t
    src = t.detach().contiguous()
    dev = _comm_device(src)
    if sizes is None:
        n = torch.tensor([src.shape[0]], dtype=torch.int64, device=dev)
        parts_n = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(parts_n, n)
        sizes = [int(s.item()) for s in parts_n]
    elif len(sizes) != dist.get_world_size() or sizes[dist.get_rank()] != src.shape[0]:
        raise ValueError(f"sizes {sizes} do not fit a world of {dist.get_world_size()} where "
                         f"this rank holds {src.shape[0]} rows")
    max_n = max(sizes)
    padded = torch.zeros((max_n, *src.shape[1:]), dtype=src.dtype, device=dev)
    padded[:src.shape[0]] = src.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)
    return out.to(t.device)


def all_gather_sizes(n: int) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order; ``[n]`` in a world of one.
    Note: the result is read on the host (a CPU-GPU sync point under NCCL)."""
    if not is_dist():
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device())
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(v) for v in torch.cat(parts).tolist()]


def broadcast(t: torch.Tensor | None, src: int = 0, *, shape: tuple[int, ...] | None = None,
              dtype: torch.dtype | None = None, device: torch.device | None = None
              ) -> torch.Tensor:
    """Send ``t`` from rank ``src`` to every rank and return it.

    On ranks other than ``src``, ``t`` may be None when ``shape`` and ``dtype`` are given;
    when they are not, the shape travels first. In a world of one, returns ``t``.
    """
    if not is_dist():
        if t is None:
            raise ValueError("broadcast without a process group needs the tensor itself")
        return t
    me = dist.get_rank()
    backend_dev = _comm_device(t)
    out_dev = t.device if t is not None else (device or backend_dev)
    if shape is None or dtype is None:
        # Send the header (ndim, shape..., dtype code) first.
        codes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                 torch.int32, torch.uint8, torch.bool]
        header = torch.zeros(10, dtype=torch.int64, device=backend_dev)
        if me == src:
            if t.dim() > 8:
                raise ValueError(f"broadcast supports at most 8 dims, got {t.dim()}")
            header[0] = t.dim()
            header[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            header[9] = codes.index(t.dtype)
        dist.broadcast(header, src)
        ndim = int(header[0])
        shape = tuple(int(x) for x in header[1:1 + ndim])
        dtype = codes[int(header[9])]
    if me == src:
        buf = t.detach().contiguous().to(backend_dev)
    else:
        buf = torch.empty(shape, dtype=dtype, device=backend_dev)
    dist.broadcast(buf, src)
    return buf.to(out_dev)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all ranks (a new tensor; ``t`` itself in a world of one)."""
    if not is_dist():
        return t
    dev = _comm_device(t)
    buf = t.detach().clone().to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return buf.to(t.device)


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over all ranks with ``op`` (``sum``, ``max`` or ``min``): a new tensor on
    ``t``'s device, no autograd; ``t`` itself in a world of one. The model-parallel softmax
    (:mod:`hfsoftmax.heads.dist_softmax`) combines its per-shard maxima and sums with it."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; valid: {', '.join(_REDUCE_OPS)}")
    if not is_dist():
        return t
    dev = _comm_device(t)
    buf = t.detach().clone().to(dev)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    return buf.to(t.device)
