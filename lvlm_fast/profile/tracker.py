"""Peak bytes of live tensors during a call: the package's one meaning of "peak memory".

DESIGN.md: *peak bytes of live tensors during a full pass*, measured on the device that ran
(CUDA: the caching allocator's peak; CPU: this live-tensor tracker) or simulated on
fake/meta tensors with the same tracker. This module provides that tracker.

API
---
``peak_live_bytes(fn, *args, **kwargs) -> int``
    Peak bytes above the level at entry while ``fn(*args, **kwargs)`` runs (the benchmark
    harness calls it with a zero-argument ``fn``).
``measure_peak(fn, *args, **kwargs) -> (result, int)``
    The same, also returning ``fn``'s result (which stays alive, and is counted).
``LiveTensorTracker``
    The context manager behind both: ``with LiveTensorTracker() as t: ...`` then
    ``t.peak_bytes``, ``t.current_bytes``, ``t.peak_by_device``, ``t.allocated_bytes``,
    ``t.num_allocations``, ``t.cuda_allocator_peak_bytes``.
``cuda_allocator_peak_bytes(fn, ...)``, ``rss_peak_bytes(fn, ...)``
    Device-level cross-checks: the CUDA caching allocator's peak, and the process's peak
    resident set size (Linux), each above the level at entry.

How it works
------------
``LiveTensorTracker`` is a ``TorchDispatchMode``: every aten (and custom) op call passes
through it. For each op it

1. marks the storages of the op's *inputs* it has not seen as **pre-existing** (alive at
   entry or created outside dispatch): they are never counted;
2. runs the op, then for each *output* storage it has not seen (deduplicated by the
   storage's identity, so views and multi-output ops that share a storage count once)
   adds ``storage.nbytes()`` to the live total of the storage's device and attaches a
   weakref callback that subtracts it again when the storage is freed;
3. records the peak of the live total (all devices together, and per device).

Storages are the unit, not tensors: a view costs nothing, a slice keeps its whole base
alive, and autograd's saved tensors count until backward frees them. A storage that grows
in place (``resize_``, ``out=`` variants) counts its growth. Meta and fake tensors have
meta storages whose ``nbytes()`` is what the real tensor would take, so the same code
simulates the peak of a pipeline without allocating it (run the pipeline on
``device="meta"``, or under ``FakeTensorMode``: the tracker must then be entered
*inside* the fake mode so it sees the fake tensors).

Why not ``torch.distributed._tools.mem_tracker.MemTracker``
-----------------------------------------------------------
Checked on torch 2.13: it runs on CPU and meta and reports bytes, but it counts a
storage that existed before the tracker the first time an op *returns* it (an in-place op
or a view of a pre-existing tensor: ``x.add_(1)`` reports ``x``'s full size as a new
allocation), so "above what was alive at entry" does not hold; it is also a private API
of the distributed package. ``torch.cuda.memory`` is CUDA-only.

What it cannot see
------------------
Allocations made *inside* a kernel and freed before it returns (a C++ kernel's scratch
buffers, a Python fallback kernel's temporaries, cuBLAS workspaces) never pass through
the dispatcher, so a dispatch-level tracker does not count them; only the op's outputs.
Tensors created outside dispatch (``torch.tensor(list)``, ``torch.from_numpy``) are
treated as pre-existing. Memory that is not a tensor storage (Python objects, allocator
caching and fragmentation, CUDA context) is out of scope by definition. Use
:func:`rss_peak_bytes` (CPU) or :func:`cuda_allocator_peak_bytes` (CUDA) to cross-check a
number at the device level.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

__all__ = [
    "LiveTensorTracker",
    "cuda_allocator_peak_bytes",
    "measure_peak",
    "peak_live_bytes",
    "rss_peak_bytes",
]


def _tensor_storages(tree: Any) -> Iterator[tuple[torch.Tensor, torch.UntypedStorage]]:
    """(tensor, its untyped storage) for every tensor in a pytree of op arguments/outputs."""
    for leaf in tree_iter(tree):
        if isinstance(leaf, torch.Tensor):
            try:
                yield leaf, leaf.untyped_storage()
            except (RuntimeError, NotImplementedError, TypeError):
                # sparse / nested / some subclasses have no single untyped storage
                continue


def _storages(tree: Any) -> Iterator[torch.UntypedStorage]:
    """Every untyped storage reachable from a pytree of op arguments/outputs."""
    for _leaf, st in _tensor_storages(tree):
        yield st


class LiveTensorTracker(TorchDispatchMode):
    """Context manager: peak bytes of tensor storages allocated and alive inside it.

    Attributes (valid during and after the ``with`` block):
        peak_bytes: peak of the live total over all devices, above the level at entry.
        current_bytes: live bytes now (of storages allocated inside the block).
        peak_by_device: ``{"cpu": int, "meta": int, "cuda:0": int, ...}`` per-device peaks.
        allocated_bytes / num_allocations: totals of every new storage seen (no frees).
        cuda_allocator_peak_bytes: if CUDA was initialised at entry, the caching
            allocator's peak above its level at entry (``torch.cuda.max_memory_allocated``;
            it includes kernels' internal allocations the dispatch level cannot see);
            else None.

    Trackers nest. Storages still alive at exit (e.g. a result) stay counted in
    ``current_bytes``; the tracker drops its weak references at exit.
    """

    def __init__(self, *, cuda_allocator: bool = True) -> None:
        super().__init__()
        self._cuda_allocator = cuda_allocator
        self._lock = threading.RLock()
        self._live: dict[int, tuple[int, str, weakref.ref]] = {}  # key -> (bytes, dev, ref)
        self._seen_pre: dict[int, tuple[int, weakref.ref]] = {}  # pre-existing: key -> bytes
        self._by_device: dict[str, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_by_device: dict[str, int] = {}
        self.allocated_bytes = 0
        self.num_allocations = 0
        self.cuda_allocator_peak_bytes: int | None = None
        self._cuda_base: int | None = None

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, dev: str, nbytes: int) -> None:
        self.current_bytes += nbytes
        cur = self._by_device.get(dev, 0) + nbytes
        self._by_device[dev] = cur
        if nbytes > 0:
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
            if cur > self.peak_by_device.get(dev, 0):
                self.peak_by_device[dev] = cur

    def _on_free(self, key: int, _ref: weakref.ref) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._add(entry[1], -entry[0])
            else:
                self._seen_pre.pop(key, None)

    def _note_input(self, st: torch.UntypedStorage) -> None:
        key = st._cdata
        if key in self._live or key in self._seen_pre:
            return
        ref = weakref.ref(st, lambda r, k=key: self._on_free(k, r))
        self._seen_pre[key] = (st.nbytes(), ref)

    def _note_output(self, st: torch.UntypedStorage) -> None:
        key = st._cdata
        nbytes = st.nbytes()
        dev = str(st.device)
        live = self._live.get(key)
        if live is not None:  # seen before: count in-place growth only
            if nbytes != live[0]:
                self._live[key] = (nbytes, live[1], live[2])
                self._add(live[1], nbytes - live[0])
            return
        pre = self._seen_pre.get(key)
        if pre is not None:  # pre-existing storage returned by an in-place op / view
            if nbytes > pre[0]:  # ... that grew inside the block: count the growth
                self._seen_pre.pop(key)
                self._live[key] = (nbytes - pre[0], dev, pre[1])
                self._add(dev, nbytes - pre[0])
            return
        ref = weakref.ref(st, lambda r, k=key: self._on_free(k, r))
        self._live[key] = (nbytes, dev, ref)
        self.allocated_bytes += nbytes
        self.num_allocations += 1
        self._add(dev, nbytes)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with self._lock:
            for st in _storages((args, kwargs)):
                self._note_input(st)
        out = func(*args, **kwargs)
        with self._lock:
            for st in _storages(out):
                self._note_output(st)
        return out

    # ------------------------------------------------------------------ context
    def __enter__(self) -> LiveTensorTracker:
        if self._cuda_allocator and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            self._cuda_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._cuda_base is not None:
                torch.cuda.synchronize()
                self.cuda_allocator_peak_bytes = int(
                    torch.cuda.max_memory_allocated() - self._cuda_base)
            with self._lock:
                # Drop the weakrefs: their callbacks must not fire into a finished tracker.
                self._live.clear()
                self._seen_pre.clear()


def measure_peak(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` under a :class:`LiveTensorTracker`; return
    ``(result, peak_bytes)`` (bytes of tensor storages allocated during the call and alive
    at the same time, the returned result included)."""
    gc.collect()  # free garbage cycles first so their frees do not land inside the call
    with LiveTensorTracker() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak_bytes


def peak_live_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak bytes of live tensor storages during ``fn(*args, **kwargs)``, above the level at
    entry (CPU, meta/fake and the visible part of CUDA; see the module docstring for what a
    dispatch-level tracker cannot see). ``peak_live_bytes(fn)`` with a zero-argument ``fn``
    is the benchmark harness's entry point."""
    _, peak = measure_peak(fn, *args, **kwargs)
    return peak


def cuda_allocator_peak_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The CUDA caching allocator's peak during the call, above its level at entry
    (includes kernels' internal allocations; excludes the allocator's cached free blocks)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_allocator_peak_bytes needs CUDA")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


# ---------------------------------------------------------------------- RSS cross-check
def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextlib.contextmanager
def _rss_sampler(interval_s: float) -> Iterator[list[int]]:
    """Poll VmRSS from a thread (used when the kernel peak cannot be reset)."""
    box = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            box[0] = max(box[0], _read_status_kib("VmRSS"))
            stop.wait(interval_s)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield box
    finally:
        stop.set()
        th.join()
        box[0] = max(box[0], _read_status_kib("VmRSS"))


def rss_peak_bytes(fn: Callable[..., Any], *args: Any, poll_interval_s: float = 0.001,
                   **kwargs: Any) -> tuple[Any, int]:
    """Cross-check on Linux: ``(result, peak RSS during the call - RSS at entry)`` in bytes.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)
    and reads ``VmHWM`` afterwards, so short spikes are caught exactly; if that is not
    permitted it polls ``VmRSS`` every ``poll_interval_s`` (may miss short spikes).
    Counts what the dispatch tracker cannot (kernel scratch buffers) but only pages actually
    touched, plus allocator effects (glibc keeps small freed blocks; large ones are
    unmapped at once), so treat it as approximate. Other threads' allocations count too.
    """
    gc.collect()
    base = _read_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        can_reset = _read_status_kib("VmHWM") <= base + 1024
    except OSError:
        can_reset = False
    if can_reset:
        result = fn(*args, **kwargs)
        peak = _read_status_kib("VmHWM")
    else:
        with _rss_sampler(poll_interval_s) as box:
            result = fn(*args, **kwargs)
        peak = box[0]
    return result, max(0, peak - base) * 1024

