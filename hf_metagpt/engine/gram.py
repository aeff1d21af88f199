"""Gram matrices of task vectors, G[i, j] = τi·τj in float64, read beside the norms.

MetaGPT's closed form assumes orthogonal task vectors (τi·τj = 0 for i ≠ j); the diagonal of G
is the squared norms the λ come from, the rest says whether the assumption holds. Three ways in,
one for each way the engine holds a tensor:

- `task_gram`: raw base and fine-tunes in their stored dtype, chunk by chunk (the fused path).
  Its diagonal is bit-identical to the chunked float64 norm loop (tests/oracles.task_sq_norms):
  same chunks, same float64 buffers, the same `torch.dot` added into the accumulator in the same
  order. So a ledger that keeps G instead of the norms changes no λ.
- `tau_gram`: task vectors already formed (the method path: DARE/TIES, --allow-nonfinite).
  Its diagonal is `methods.base.squared_norm` of each τ, the norm that path records today.
- `mixed_gram`: any mix of formed τ, LoRA factors (`LowRank`) and untouched tensors (None).
  LoRA pairs are exact from the factors, never forming Δ:
  ⟨si·Bi·Ai, sj·Bj·Aj⟩ = si·sj·Σ((BiᵀBj) ⊙ (Ai·Ajᵀ)), two small matrices of rank size;
  an adapter against a formed τ is si·Σ((Biᵀ·τ) ⊙ Ai), taken over blocks of τ's rows, so the
  adapter's Δ is never formed either (memory: rank × columns, not the tensor).

Everything here is pure tensor math: no I/O, no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import kernels
from ..methods.base import squared_norm

#: rows of τ converted to float64 at a time for an adapter-against-τ dot product (bounded memory).
BLOCK_ELEMENTS = 1 << 20


def _mirror(acc: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle onto the lower one (the diagonal is left untouched)."""
    n = acc.shape[0]
    if n > 1:
        iu = torch.triu_indices(n, n, 1, device=acc.device)
        acc[iu[1], iu[0]] = acc[iu[0], iu[1]]
    return acc


def task_gram(base: torch.Tensor, models: list[torch.Tensor], *, rows: int | None = None,
              device: torch.device | str = "cpu", chunk: int | None = None) -> torch.Tensor:
    """G[i, j] = (θi − θ0)·(θj − θ0) for every pair of models, T×T float64 on `device`.

    Inputs in their stored dtype, `rows` cuts the shared vocabulary rows, NaN/Inf propagate; the
    diagonal equals the chunked float64 norm loop's result bit for bit: each model's difference
    gets its own freshly allocated buffer (as the norm loop's single buffer is), so every
    `torch.dot` sees the same values at the same alignment.

    Args:
        base: θ0 (any floating dtype).
        models: θ1..θT, each of the base's shape.
        rows: merge only the first `rows` rows (shared vocabulary).
        device: where the float64 buffers and the result live.
        chunk: elements per chunk (default `kernels.CHUNK`).

    Returns:
        A symmetric T×T float64 tensor.
    """
    device = torch.device(device)
    b_flat = kernels.flat(base, rows)
    m_flats = [kernels.flat(m, rows) for m in models]
    n = b_flat.numel()
    t_count = len(models)
    if n == 0 or t_count == 0:
        return torch.zeros(t_count, t_count, dtype=torch.float64, device=device)
    step = chunk or kernels.CHUNK
    width = min(n, step)
    # One row per model's difference, each starting at an aligned address like a fresh buffer, so
    # every dot product sees the values at the alignment the norm loop's own buffer gives them.
    stride = -(-width // 64) * 64  # rows 512-byte aligned whatever the width
    bbuf = torch.empty(width, dtype=torch.float64, device=device)
    tbuf = torch.empty(t_count, stride, dtype=torch.float64, device=device)[:, :width]
    b_parts = b_flat.split(step)
    m_parts = [m.split(step) for m in m_flats]
    count = len(b_parts)
    # The pairs (j, i), j ≤ i, in the order they were always accumulated; each chunk's dot products
    # go into their own slot (`out=`: one torch call each, the interpreter lock released inside),
    # and are added chunk by chunk afterwards, in the same order, from 0.0, in float64.
    pairs = [(j, i) for i in range(t_count) for j in [i, *range(i)]]
    dots = torch.empty(count, len(pairs), dtype=torch.float64, device=device)
    slots = dots.view(-1).unbind()
    last = n - (count - 1) * step
    k = 0
    for c in range(count):
        size = step if c < count - 1 else last
        b = bbuf[:size] if size < width else bbuf
        ts = tbuf[:, :size] if size < width else tbuf
        b.copy_(b_parts[c])
        rows_ = ts.unbind()
        for t, parts in zip(rows_, m_parts):
            t.copy_(parts[c])
        ts.sub_(b)
        for j, i in pairs:
            torch.dot(rows_[j], rows_[i], out=slots[k])
            k += 1
    return _mirror(_add_in_order(dots, pairs, t_count))


def _add_in_order(dots: torch.Tensor, pairs: list[tuple[int, int]], t_count: int,
                  on_host: bool | None = None) -> torch.Tensor:
    """G[j, i] = ((0 + d₁) + d₂) + … over the chunks' dot products, in chunk order, in float64.

    The accumulation `acc[j, i] += dot` always did (bit for bit): on the CPU as Python floats
    (IEEE double additions, one `tolist` per job); elsewhere as tensor additions on the device (a
    GPU job is one chunk, so no read back)."""
    device = dots.device
    if on_host if on_host is not None else device.type == "cpu":
        acc = [[0.0] * t_count for _ in range(t_count)]
        for row in dots.tolist():
            for (j, i), v in zip(pairs, row):
                acc[j][i] += v
        return torch.tensor(acc, dtype=torch.float64)
    out = torch.zeros(t_count, t_count, dtype=torch.float64, device=device)
    idx = torch.tensor(pairs, device=device).t()
    for row in dots:
        out[idx[0], idx[1]] += row
    return out


def _dense_dot(x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """x·y in float64, converting `chunk` elements at a time (no full-size float64 copy)."""
    xf, yf = x.reshape(-1), y.reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, xf.numel(), chunk):
        stop = start + chunk
        acc += torch.dot(xf[start:stop].double(), yf[start:stop].double())
    return acc


def tau_gram(taus: Sequence[torch.Tensor], *, chunk: int | None = None) -> torch.Tensor:
    """G[i, j] = τi·τj of formed task vectors (any floating dtype), T×T float64 on their device.

    The diagonal is `squared_norm(τ)`, bit for bit what the method path records as the norm;
    the rest is accumulated in float64, `chunk` elements at a time.
    """
    return mixed_gram(list(taus), chunk=chunk)


@dataclass(frozen=True)
class LowRank:
    """A LoRA task vector Δ = scale·B·A, or scale·(B·A)ᵀ when `transposed`.

    `transposed` is peft's fan_in_fan_out, and always set for embedding LoRA (peft stores A as
    (r, num_embeddings) and returns (B·A)ᵀ). Factors in any floating dtype; products are float64.
    """

    b: torch.Tensor  # (m, r)
    a: torch.Tensor  # (r, n)
    scale: float
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.b.shape[0], self.a.shape[1]
        return (n, m) if self.transposed else (m, n)


def lowrank_sq_norm(x: LowRank) -> float:
    """‖Δ‖² from the factors: scale² · Σ((BᵀB) ⊙ (AAᵀ)), as tests/oracles.lora_sq_norm checks."""
    gb = x.b.double().t() @ x.b.double()
    ga = x.a.double() @ x.a.double().t()
    return float(x.scale) ** 2 * float((gb * ga).sum())


def lowrank_dot(x: LowRank, y: LowRank) -> float:
    """⟨Δx, Δy⟩ exactly from the factors (small matrices of rank size, float64).

    Same orientation: ⟨BxAx, ByAy⟩ = trace(AxᵀBxᵀByAy) = Σ((BxᵀBy) ⊙ (AxAyᵀ)).
    One transposed: ⟨(BxAx)ᵀ, ByAy⟩ = trace(BxAxByAy) = Σ((AxBy) ⊙ (AyBx)ᵀ).
    """
    if x is y:
        return lowrank_sq_norm(x)
    if x.shape != y.shape:
        raise ValueError(f"low-rank updates of different shapes: {x.shape} and {y.shape}")
    bx, ax, by, ay = x.b.double(), x.a.double(), y.b.double(), y.a.double()
    if x.transposed == y.transposed:
        inner = ((bx.t() @ by) * (ax @ ay.t())).sum()
    else:
        inner = ((ax @ by) * (ay @ bx).t()).sum()
    return float(x.scale) * float(y.scale) * float(inner)


def lowrank_dense_dot(x: LowRank, tau: torch.Tensor, *, minus: torch.Tensor | None = None,
                      rows: int | None = None, block: int = BLOCK_ELEMENTS) -> float:
    """⟨Δx, τ⟩ without forming Δx: scale·Σ((Bᵀ·τ) ⊙ A), over blocks of τ's rows in float64.

    `minus` is subtracted from `tau` block by block (pass the raw fine-tune and the base: τ is
    never formed at full size either); `rows` cuts both to the shared vocabulary rows.
    When Δ = (B·A)ᵀ: ⟨Δ, τ⟩ = ⟨B·A, τᵀ⟩ = Σ((τ·B)ᵀ ⊙ A), and a block of τ's rows meets the
    same columns of A.
    """
    if rows is not None:
        tau = tau[:rows]
        minus = None if minus is None else minus[:rows]
    if tuple(tau.shape) != x.shape:
        raise ValueError(f"a low-rank update of shape {x.shape} against a tensor of shape {tuple(tau.shape)}")
    b, a = x.b.double(), x.a.double()
    cols = max(1, tau.shape[1])
    step = max(1, block // cols)
    total = torch.zeros((), dtype=torch.float64, device=tau.device)
    bt_tau = None if x.transposed else torch.zeros(a.shape, dtype=torch.float64, device=tau.device)
    for r0 in range(0, tau.shape[0], step):
        r1 = min(r0 + step, tau.shape[0])
        t = tau[r0:r1].to(torch.float64, copy=True)
        if minus is not None:
            t.sub_(minus[r0:r1].double())
        if x.transposed:
            total += ((t @ b).t() * a[:, r0:r1]).sum()
        else:
            bt_tau.addmm_(b[r0:r1].t(), t)  # type: ignore[union-attr]
    if bt_tau is not None:
        total = (bt_tau * a).sum()
    return float(x.scale) * float(total)


def mixed_gram(parts: Sequence[torch.Tensor | LowRank | None], *, chunk: int | None = None) -> torch.Tensor:
    """G[i, j] of one tensor's task vectors given as formed τ, LoRA factors, or None (τ = 0).

    Diagonal: `squared_norm(τ)` for a formed τ, `lowrank_sq_norm` for factors (both bit for bit
    the norms the engine records), 0 for None. Off the diagonal: float64 dot products for two
    formed τ (`chunk` elements at a time), `lowrank_dot` for two adapters, `lowrank_dense_dot`
    for an adapter against a formed τ.

    Returns:
        A symmetric T×T float64 tensor (on the first formed τ's device, else the CPU).
    """
    step = chunk or kernels.CHUNK
    device = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
    n = len(parts)
    acc = torch.zeros(n, n, dtype=torch.float64, device=device)
    for i, p in enumerate(parts):
        if p is None:
            continue
        acc[i, i] = squared_norm(p) if isinstance(p, torch.Tensor) else lowrank_sq_norm(p)
        for j in range(i):
            q = parts[j]
            if q is None:
                continue
            if isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor):
                v = float(_dense_dot(q, p, step))
            elif isinstance(p, LowRank) and isinstance(q, LowRank):
                v = lowrank_dot(q, p)
            elif isinstance(p, LowRank):
                v = lowrank_dense_dot(p, q)  # type: ignore[arg-type]
            else:
                v = lowrank_dense_dot(q, p)  # type: ignore[arg-type]
            acc[j, i] = v
    return _mirror(acc)
