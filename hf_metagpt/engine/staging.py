"""GPU staging: a piece's host→device copies made on the reader thread, from pinned read buffers.

Without it (`GpuFusedKernel._upload`), the main thread copies each piece to the GPU when it starts
merging it, from pageable memory: the copy goes through the driver's staging buffer and the GPU
waits for it. With `HF_METAGPT_GPU_STAGING=1`:

- the feed's pooled read buffers are allocated once in page-locked memory (`pinned`), so a copy
  runs at the bus's speed, straight from where the reader put the bytes;
- the reader thread, right after it has read a piece, copies each input's bytes of the piece to
  the GPU on its own CUDA stream (`stage`) and waits for that stream there (the interpreter lock
  is released meanwhile): the copy of piece k+1 runs while the main thread merges piece k;
- the main thread finds the piece's device bytes ready (`lookup`) and merges from them.

Only where and when bytes move changes, never the arithmetic: the same device tensors, the same
kernels, the same bytes (tests/methods/test_cuda.py compares staged and plain runs).

Why a copy is safe to use and its host buffer safe to reuse: `stage` returns only after its copies
finished (`Stream.synchronize` on the reader thread), so a pooled buffer is never overwritten under
a copy in flight; each device copy is marked as used by the compute stream (`record_stream`), so
the caching allocator reuses its memory only after the merge's kernels that read it have run. The
reader reuses a pool slot only after the main thread finished the piece in it (`feed.walk`), and
each piece's staged copies are dropped when a later read takes their slot (`SLOTS`).

Off by default until measured on a GPU machine (`bench/device_check.py` times both).
On the CPU device (tests only) a copy is a `clone`: the same code paths without CUDA.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Sequence

import torch

from ..constants import GPU_STAGING_ENV

#: pieces whose device copies are kept: the feed's pool slots (one merging, one being read)
SLOTS = 2

#: device bytes of one contiguous span of a pooled host buffer, and the span's first byte there
Span = tuple[torch.Tensor, int]
#: a span starts at a multiple of this in its host storage, so each tensor keeps its alignment in the
#: device copy (an fp32 tensor after an odd-sized bf16 one could not be viewed as fp32 otherwise)
SPAN_ALIGN = 64


def staging_enabled() -> bool:
    """`HF_METAGPT_GPU_STAGING=1`: GPU runs copy pieces on the reader thread from pinned buffers."""
    return os.environ.get(GPU_STAGING_ENV, "0") == "1"


def spans(raws: Sequence[dict[str, torch.Tensor] | None], names: Sequence[str] | None = None) -> dict[int, list]:
    """The contiguous byte spans of the raws' host tensors, by storage: {data_ptr: [storage, lo, hi]}.

    A piece's tensors of one input lie side by side in the pooled buffer, so each input is one span
    (the gaps between its tensors, a few alignment bytes, go along); a span starts at a multiple of
    `SPAN_ALIGN` of its storage. `names`: only these tensors.
    """
    out: dict[int, list] = {}
    for raw in raws:
        if raw is None:
            continue
        for name in (raw if names is None else names):
            t = raw[name]
            if not t.is_contiguous() or t.device.type != "cpu" or t.numel() == 0:
                continue
            st = t.untyped_storage()
            lo = t.storage_offset() * t.element_size()
            hi = lo + t.numel() * t.element_size()
            span = out.setdefault(st.data_ptr(), [st, lo, hi])
            span[1], span[2] = min(span[1], lo), max(span[2], hi)
    for span in out.values():
        span[1] -= span[1] % SPAN_ALIGN
    return out


def span_bytes(storage: torch.UntypedStorage, lo: int, hi: int) -> torch.Tensor:
    """Bytes [lo, hi) of a host storage as a uint8 tensor (a view: no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, lo, (hi - lo,))


def device_view(t: torch.Tensor, found: dict[int, Span]) -> torch.Tensor | None:
    """`t` (a contiguous host tensor) as a view of the device copy of the span holding it, if any."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    entry = found.get(t.untyped_storage().data_ptr())
    if entry is None:
        return None
    g, base = entry
    lo = t.storage_offset() * t.element_size() - base
    hi = lo + t.numel() * t.element_size()
    if lo < 0 or hi > g.numel():
        return None
    return g[lo:hi].view(t.dtype).view(t.shape)


class Stager:
    """Copies each piece the feed reads to `device` on the reader thread (see the module).

    Args:
        device: where the kernel merges (CUDA; the CPU device in tests, where a copy is a clone).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        #: the feed's pooled read buffers are page-locked (a CUDA device only)
        self.pinned = cuda
        self._stream = torch.cuda.Stream(device) if cuda else None
        # the stream the kernel merges on: this object is made by the kernel, on the merging thread
        self._compute = torch.cuda.current_stream(device) if cuda else None
        # piece → its device spans; a piece is its raws' input dicts (kept referenced here, so
        # their ids are not reused while an entry lives)
        self._staged: dict[int, tuple[dict, dict[int, Span]]] = {}
        self._pieces: deque[list[int]] = deque()
        self._lock = threading.Lock()
        #: spans copied; tensor lookups served from a staged copy / not staged (copied by the kernel)
        self.copied = 0
        self.hits = 0
        self.misses = 0
        #: names of the threads that staged (the reader's, by design)
        self.threads: set[str] = set()

    def stage(self, raws: Sequence[dict[str, torch.Tensor] | None]) -> None:
        """Copy a piece's host bytes to the device and wait for the copies (reader thread)."""
        found = spans(raws)
        if not found:
            return
        device = self.device
        copies: dict[int, Span] = {}
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for key, (st, lo, hi) in found.items():
                    copies[key] = (span_bytes(st, lo, hi).to(device, non_blocking=self.pinned), lo)
            self._stream.synchronize()
            for g, _ in copies.values():
                g.record_stream(self._compute)  # freed only after the merge's kernels that read it
        else:
            for key, (st, lo, hi) in found.items():
                copies[key] = (span_bytes(st, lo, hi).clone(), lo)
        keys = [id(raw) for raw in raws if raw is not None]
        with self._lock:
            for raw in raws:
                if raw is not None:
                    self._staged[id(raw)] = (raw, copies)
            self._pieces.append(keys)
            while len(self._pieces) > SLOTS:
                for k in self._pieces.popleft():
                    self._staged.pop(k, None)
            self.copied += len(copies)
        self.threads.add(threading.current_thread().name)

    def lookup(self, raw: dict[str, torch.Tensor]) -> dict[int, Span] | None:
        """The device spans staged for this input's dict of a piece (main thread), or None; counted
        as a hit or a miss."""
        with self._lock:
            entry = self._staged.get(id(raw))
        found = entry[1] if entry is not None and entry[0] is raw else None
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def counts(self) -> dict[str, int]:
        """What the run staged (`StreamStats.staging`, the time account's "staging")."""
        return {"copied": self.copied, "hits": self.hits, "misses": self.misses}
