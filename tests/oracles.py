"""Oracles the engine's fast paths are compared with bit for bit: plain loops, no engine code.

`reference.py` checks the formula in float64 on whole state dicts; these check the engine's
arithmetic at its own granularity (the same float64 chunks, in the same order), so a test can ask
for equality, not closeness. The package never calls them: they live with the tests.
"""

from __future__ import annotations

import torch

#: the engine's chunk (`hf_metagpt.engine.kernels.CHUNK`; test_kernels asserts they agree)
CHUNK = 1 << 18


def task_sq_norms(base: torch.Tensor, models: list[torch.Tensor], *, rows: int | None = None,
                  device: torch.device | str = "cpu", chunk: int | None = None) -> torch.Tensor:
    """‖θt − θ0‖² for every model, float64 on `device` (NaN/Inf propagate), chunk by chunk.

    Each chunk of the (first `rows` rows of the) inputs is copied into a float64 buffer, the
    difference taken in place and its `torch.dot` added into the accumulator, in model order.
    """
    device = torch.device(device)
    b_flat = (base[:rows] if rows is not None else base).reshape(-1)
    m_flats = [(m[:rows] if rows is not None else m).reshape(-1) for m in models]
    n = b_flat.numel()
    acc = torch.zeros(len(models), dtype=torch.float64, device=device)
    if n == 0:
        return acc
    step = chunk or CHUNK
    bbuf = torch.empty(min(n, step), dtype=torch.float64, device=device)
    tbuf = torch.empty(min(n, step), dtype=torch.float64, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        b = bbuf[: stop - start]
        b.copy_(b_flat[start:stop])
        t = tbuf[: stop - start]
        for i, m in enumerate(m_flats):
            t.copy_(m[start:stop])
            t.sub_(b)
            acc[i] += torch.dot(t, t)
    return acc


def lora_sq_norm(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """‖scale·B·A‖²_F = scale² · trace((BᵀB)(AAᵀ)), from two r×r matrices in float64.

    Both Gram matrices are symmetric, so the trace of their product is the sum of their
    elementwise product. Transposing Δ does not change its norm.
    """
    gb = b.double().t() @ b.double()
    ga = a.double() @ a.double().t()
    return float(scale) ** 2 * float((gb * ga).sum())


def lowrank_dense(x, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Δ = scale·B·A of an `engine.gram.LowRank` formed in `dtype` (transposed as it says): what the
    Gram functions compute from the factors without ever forming it."""
    d = x.b.to(dtype) @ x.a.to(dtype)
    return (d.t() if x.transposed else d) * x.scale
