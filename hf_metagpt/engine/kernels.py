"""Fused, chunked tensor kernels for the common case: a merge that is a weighted sum of models.

MetaGPT, task arithmetic and linear all merge as w0·θ0 + Σt wt·θt once their coefficients are
known, and MetaGPT's norms are Σ (θt − θ0)². Done on whole tensors, each step makes a full-size
float32 temporary per model and walks memory several times (the naive engine spent most of its
time there). Here every tensor is walked in chunks that stay in the CPU cache: each chunk is
converted once into a reused float64 buffer, and the norm or the weighted sum is accumulated in
place: at least as exact as the float32 path docs/method.md asks for, with one rounding to the
output dtype at the end.
"""

from __future__ import annotations

import torch

#: elements per chunk of the Gram and norm kernels: 256 Ki float64 = 2 MiB per buffer. Their
#: float64 dot products are summed chunk by chunk, so this constant is part of the λ's bits: never
#: tune it (a tensor's norms are the same sums on every machine).
CHUNK = 1 << 18
#: elements per chunk of the weighted sum on the CPU (`weighted_models`). Elementwise: each output
#: element gets the same arithmetic whatever the chunk (a multiple of every SIMD width), so this
#: one is free to tune; measured per 4 Mi-element job on one thread (2026-12-04, 1 MiB L2):
#: 2^15 11.5 ms, 2^16 9.8, 2^17 8.6, 2^18 9.0, 2^19 9.8, 2^20 14.3 — larger chunks leave the cache
#: faster than they save interpreter calls.
MERGE_CHUNK = 1 << 18


def flat(t: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The tensor (its first `rows` rows) as one flat view: kernels work on element ranges."""
    if rows is not None:
        t = t[:rows]
    return t.reshape(-1)


def _buffers(n: int, device: torch.device, k: int, step: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.empty(min(n, step), dtype=dtype, device=device) for _ in range(k)]


def weighted_models(base: torch.Tensor, models: list[torch.Tensor], w0: float, weights: list[float],
                    out_dtype: torch.dtype, *, rows: int | None = None,
                    device: torch.device | str = "cpu", chunk: int | None = None,
                    out: torch.Tensor | None = None, out_sum: torch.Tensor | None = None) -> torch.Tensor:
    """w0·θ0 + Σt wt·θt, accumulated chunk by chunk, rounded once into `out_dtype`.

    The accumulator is float64: as fast as float32 here (the chunk stays in cache), and it makes
    the final rounding the only one that matters, even where task vectors cancel and the result
    is far smaller than the inputs (float32 would be off by several output ulps there).

    Returns a tensor of the (row-cut) base's shape on `device`, or fills `out` (same number of
    elements, e.g. a range of a larger flat output) and returns it. Models whose weight is 0 are
    not touched at all. `out_sum` (a 0-d tensor): the sum of the rounded output is added to it
    (`finite_sum`'s, taken chunk by chunk while the chunk is in cache).

    Each chunk is a fixed handful of torch calls on views cut once (`split`), each of which
    releases the interpreter lock for its whole chunk: compute threads spend their time in
    torch, not queueing for the lock. Elementwise, so the chunk size (default `MERGE_CHUNK` on
    the CPU, `CHUNK` elsewhere) changes no output bit.
    """
    device = torch.device(device)
    src = base[:rows] if rows is not None else base
    if out is None:
        out = torch.empty(src.shape, dtype=out_dtype, device=device)
    o_flat = out.reshape(-1)
    b_flat = flat(base, rows)
    terms = [(w, flat(m, rows)) for w, m in zip(weights, models) if w != 0.0]
    n = b_flat.numel()
    if n == 0:
        return out
    step = chunk or (MERGE_CHUNK if device.type == "cpu" else CHUNK)
    abuf, tbuf = _buffers(n, device, 2, step, torch.float64)
    b_parts = b_flat.split(step)
    o_parts = o_flat.split(step)
    t_parts = [(w, m.split(step)) for w, m in terms]
    count = len(b_parts)
    sums = None
    if out_sum is not None:
        wide = torch.float64 if out.dtype in (torch.float32, torch.float64) else torch.float32
        sums = torch.empty(count, dtype=wide, device=device)
        slots = sums.unbind()
    last = n - (count - 1) * step
    a_last, t_last = abuf[:last], tbuf[:last]
    # On the CPU a model's chunk is added straight from its stored dtype: torch converts it to
    # float64 (exactly) and runs the same float64 add as after an explicit copy, the same bits
    # (tests/engine/test_kernels.py) in one torch call instead of two — each call is one more
    # hand-over of the interpreter lock between compute threads. Elsewhere the explicit copy stays
    # (a GPU runs one chunk per tensor: nothing to save, and its mixed-dtype kernels are others).
    mixed = device.type == "cpu"
    for c in range(count):
        a, t = (abuf, tbuf) if c < count - 1 else (a_last, t_last)
        a.copy_(b_parts[c])
        if w0 != 1.0:
            a.mul_(w0)
        for w, parts in t_parts:
            if mixed:
                a.add_(parts[c], alpha=w)
            else:
                t.copy_(parts[c])
                a.add_(t, alpha=w)
        o = o_parts[c]
        o.copy_(a)
        if sums is not None:
            torch.sum(o, 0, dtype=sums.dtype, out=slots[c])
    if out_sum is not None:
        out_sum += sums.sum(dtype=torch.float64)  # type: ignore[union-attr]
    return out


def finite_sum(t: torch.Tensor) -> torch.Tensor:
    """A cheap finiteness check: the sum of `t`, finite when every value is (NaN or ±Inf make it not).

    A float32 sum of 16-bit values (float64 for wider ones) never overflows from finite values
    but for the very largest bfloat16 values, where it only makes the caller take the exact check.
    About 20 times faster than `torch.isfinite(t).all()`, which builds a bool tensor.
    """
    wide = torch.float64 if t.dtype in (torch.float32, torch.float64) else torch.float32
    return t.sum(dtype=wide).to(torch.float64)


def base_plus_lowrank(base: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]], transposed: list[bool],
                      c0: float, *, out: torch.Tensor) -> torch.Tensor:
    """out = c0·base + Σ B·A (each (B·A)ᵀ where `transposed`), rounded once into `out`.

    A merge of LoRA adapters: the B factors come scaled by each model's weight and LoRA scale,
    and stacked side by side (one product of rank Σr instead of one full-size Δ per adapter).
    The accumulator takes the factors' dtype: float64 makes the product exact to the output's
    rounding (in float32 a rank-48 sum whose terms cancel is off by several output ulps).
    Called on blocks of rows, so the accumulator stays small.
    """
    dtype = factors[0][0].dtype if factors else torch.float32
    acc = base.to(out.device, dtype, copy=True)
    if c0 != 1.0:
        acc.mul_(c0)
    for (b, a), t in zip(factors, transposed):
        if t:
            acc.add_((b @ a).t())
        else:
            acc.addmm_(b, a)
    out.copy_(acc)
    return out
