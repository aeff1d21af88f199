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

#: elements per chunk: 256 Ki float32 = 1 MiB per buffer, a few buffers fit in L2.
CHUNK = 1 << 18


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
    not touched at all. `out_sum` (a 0-d tensor): the sum of the rounded output is added to it,
    chunk by chunk while the chunk is in cache (`finite_sum`).
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
    step = chunk or CHUNK
    abuf, tbuf = _buffers(n, device, 2, step, torch.float64)
    for start in range(0, n, step):
        stop = min(start + step, n)
        a = abuf[: stop - start]
        a.copy_(b_flat[start:stop])
        if w0 != 1.0:
            a.mul_(w0)
        t = tbuf[: stop - start]
        for w, m in terms:
            t.copy_(m[start:stop])
            a.add_(t, alpha=w)
        o = o_flat[start:stop]
        o.copy_(a)
        if out_sum is not None:
            out_sum += finite_sum(o)
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
