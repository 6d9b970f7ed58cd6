"""How often one training step makes the host wait for a GPU, counted on the CPU.

The step's device tensors are marked (a tensor subclass, :class:`OnDevice`, that every torch
operation passes on to its results, as it would keep them on the GPU), and a
``TorchFunctionMode`` counts each call that would wait for a GPU when made on one of them:
reading a value (``item``, ``tolist``, ``numpy``, ``bool``/``float``/``int``), copying to
the host (``cpu``, ``to('cpu')``, a blocking ``copy_`` into a host tensor) and
data-dependent shapes (``nonzero``, ``unique``, boolean indexing). What such a call returns
is on the host, so it is unmarked: later host work on it is free, as on a GPU. Copies with
``non_blocking=True`` do not wait. Gradients are made by autograd, not by torch functions,
so the test marks them where they appear: the parameters' (a hook on each) and the row
gradient the sampled head's push hook receives. The mode sees the training thread only (the
row store's push thread waits for its own copies without holding up the step), and
autograd's backward on the CPU runs on the calling thread, so the push hook's calls are
counted too.

One unlogged step of the trainer (to_device, TrainStep, StepCounters.add): the full head
makes none; the sampled head with the host index makes one, the copy of the features to the
host for the selection (the labels travel beside them, copied without waiting).
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hfsoftmax.engine.config import parse_args
from hfsoftmax.engine.gpu_data import build_train_images, to_device
from hfsoftmax.engine.optim import Precision, build_optimizer
from hfsoftmax.engine.step import StepCounters, TrainStep
from hfsoftmax.data.uint8 import collate_uint8
from hfsoftmax.heads.base import correct_count
from hfsoftmax.heads import SampledHead
from hfsoftmax.heads.factory import build_head_from_args
from hfsoftmax.heads.sampled_config import rule_from_args
from hfsoftmax.models import build_backbone
from hfsoftmax.engine.model import prepare_head
from hfsoftmax.train import _close_head

pytestmark = pytest.mark.timeout(300)

torch.set_num_threads(1)


class OnDevice(torch.Tensor):
    """A tensor that stands for one on the GPU (torch ops keep the subclass)."""


_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
          "__array__", "nonzero", "unique", "unique_consecutive", "masked_select", "cpu"}


def _is_cpu(x) -> bool:
    return (isinstance(x, str) and x.startswith("cpu")) or \
        (isinstance(x, torch.device) and x.type == "cpu") or \
        (isinstance(x, torch.Tensor) and not isinstance(x, OnDevice))


def _unmark(x):
    if isinstance(x, OnDevice):
        return x.as_subclass(torch.Tensor)
    if isinstance(x, (tuple, list)):
        return type(x)(_unmark(v) for v in x)
    return x


class SyncCounter(TorchFunctionMode):
    """Counts the calls that would synchronise a GPU (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def _waits(self, name: str, args, kwargs) -> bool:
        if not args:
            return False
        me = args[0]
        if name in _READS:
            return isinstance(me, OnDevice)
        if name == "to":
            if not isinstance(me, OnDevice) or kwargs.get("non_blocking") or \
                    any(a is True for a in args[1:]):
                return False
            return any(_is_cpu(a) for a in (*args[1:], kwargs.get("device"))
                       if a is not None and not isinstance(a, torch.dtype))
        if name == "copy_":
            src = args[1] if len(args) > 1 else kwargs.get("src")
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
            return isinstance(src, OnDevice) and not isinstance(me, OnDevice) and blocking
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, OnDevice) and i.dtype == torch.bool for i in idx)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        waits = self._waits(name, args, kwargs)
        if name == "backward":
            # a mode is off inside its own handler, and Tensor.backward would come back to
            # it: run autograd's engine itself with the mode on, so that the hooks it runs
            # (the push's) are seen
            from torch.autograd.graph import _engine_run_backward

            t = args[0]
            grad = args[1] if len(args) > 1 else kwargs.get("gradient")
            grad = torch.ones_like(t) if grad is None else grad
            with self:
                _engine_run_backward((t,), (grad,), False, False, (), allow_unreachable=True,
                                     accumulate_grad=True)
            return None
        out = func(*args, **kwargs)
        if waits:
            where = next((f"{f.filename.split('hfsoftmax/')[-1]}:{f.lineno}"
                          for f in reversed(traceback.extract_stack())
                          if "/hfsoftmax/" in f.filename), "?")
            self.calls.append((name, where))
            out = _unmark(out)
        return out


TINY = ["--arch", "convnet-s", "--embedding-size", "32", "--batch-size", "16", "--workers",
        "0", "--threads", "1", "--head", "cosface", "--scale", "16", "--margin", "0.1"]


def _mark_grad(g):
    return g.as_subclass(OnDevice)


@pytest.fixture
def marked_push(monkeypatch):
    """The row gradient reaching the sampled head's push hook, marked as on the device."""
    make_hook = SampledHead._push_hook

    def marked(self, *a):
        hook = make_hook(self, *a)
        return lambda grad: hook(_mark_grad(grad))

    monkeypatch.setattr(SampledHead, "_push_hook", marked)


def _one_step_calls(argv, threaded: bool = True) -> list[tuple[str, str]]:
    """The counted calls of the second of two unlogged steps (the first builds the index)."""
    args = parse_args(argv)
    device = torch.device("cpu")
    images = build_train_images(args)
    batch = collate_uint8([images[(i, i % 2 == 0)] for i in range(16)])
    torch.manual_seed(0)
    backbone = build_backbone(args.arch, args.embedding_size)
    head, store = build_head_from_args(args, 40, rule_from_args(args) if args.sampled else None)
    head, store = prepare_head(args, head, store, device)
    if store is not None and not threaded:  # the push in the hook, as without the thread
        store.async_push = False
    for p in [*backbone.parameters(), *head.parameters()]:
        p.register_hook(_mark_grad)
    try:
        opt = build_optimizer(args, [backbone, head], device)
        step = TrainStep(backbone, head, opt, Precision.from_args(args, device), split=True)
        counters = StepCounters(device)
        marked = tuple(t.as_subclass(OnDevice) for t in batch)  # as if already on the GPU
        calls = []
        for i in range(2):
            with SyncCounter() as counter:
                x, y = to_device(marked, device)
                out = step(x, y)
                counters.add(out.loss, correct_count(out), y.shape[0], i)
            calls = counter.calls
        loss, acc = counters.read(0)  # the logged step's read: finite, plausible
        assert loss > 0 and 0 <= acc <= 1
        return calls
    finally:
        _close_head(head, store)


def test_counter_counts_what_would_wait():
    """The counter is not blind: reads, host copies and boolean masks of device tensors
    count; non-blocking copies, host tensors and what a read returned do not."""
    t = torch.arange(6.0).as_subclass(OnDevice)
    host = torch.empty(6)
    with SyncCounter() as c:
        t.sum().item()
        h = t.cpu()
        h.numpy()                                  # already on the host: free
        t.to("cpu")
        host.copy_(t, non_blocking=True)           # asynchronous: free
        host.copy_(t)
        t[t > 2]
        bool(t.sum() > 0)
        t.to(torch.float64, non_blocking=True)
    assert [n for n, _ in c.calls] == ["item", "cpu", "to", "copy_", "__getitem__",
                                       "__bool__"]


def test_an_unlogged_step_of_the_full_head_waits_never(tiny_rec, marked_push):
    calls = _one_step_calls(["--train-rec", str(tiny_rec), *TINY])
    assert calls == [], calls


@pytest.mark.parametrize("sampler", ["exact", "random"])
def test_an_unlogged_step_of_the_sampled_head_waits_once(tiny_rec, sampler, marked_push):
    """The one wait: the features' copy to the host for the selection
    (heads/push.py, host_inputs). The push is copied without waiting and sent from the
    row store's thread; the fresh rows (exact) are noted there too."""
    calls = _one_step_calls(["--train-rec", str(tiny_rec), *TINY, "--sampled", "--sampler",
                             sampler, "--sample-num", "24", "--interval", "100",
                             "--no-background-rebuild", "--recall-every", "0"])
    assert len(calls) <= 2, calls
    assert [n for n, _ in calls] == ["cpu"], calls
    assert calls[0][1].startswith("heads/push.py"), calls  # host_inputs


def test_the_counter_sees_a_push_that_waits(tiny_rec, marked_push):
    """Pushed in the hook (the store without its thread), the step waits a second time, for
    the row gradient's copy to the host: the count above is not blind to the push."""
    calls = _one_step_calls(["--train-rec", str(tiny_rec), *TINY, "--sampled", "--sampler",
                             "random", "--sample-num", "24", "--recall-every", "0"],
                            threaded=False)
    assert [n for n, _ in calls] == ["cpu", "to"], calls
    assert calls[1][1].startswith("heads/sampled.py"), calls
