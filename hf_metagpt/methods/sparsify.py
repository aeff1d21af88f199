"""Sparsifiers of one task vector, with mergekit's counting, tie-breaking and rescaling.

Each returns a new tensor (never `tau` itself unless nothing is dropped) and keeps `tau` intact.

- `magnitude` (TIES): keep the k = max(1, ⌊density·n⌋) largest |τ|; at equal magnitudes the
  order of `torch.argsort(|τ|, descending=True)` *on the CPU* decides, the call mergekit 0.1.5
  makes on CPU, so both tools keep the same entries on any device with the same torch version.
- `magnitude_outliers` (Model Breadcrumbs): drop the ⌊γ·n⌋ largest and then the smallest
  magnitudes, keeping ⌊density·n⌋ entries (the outlier cut shrinks when both don't fit).
- `random` (DARE): keep each entry with probability density (a Bernoulli mask drawn from the
  tensor's own seeded generator; mergekit uses torch's global one, so masks differ but not their
  statistics).
- `della_magprune` (DELLA): keep each entry with a probability that rises with its magnitude
  rank within its row, from density − ε (smallest) to density + ε (largest).

`rescale` (mergekit's `rescale`, default on for DARE and DELLA) multiplies the kept entries by
‖τ‖₁ / ‖τ̃‖₁ of the whole tensor, where the papers use 1/density (DARE) or 1/p_i (DELLA): equal
in expectation, and exact per tensor. Tensors whose ‖·‖₁ is under 1e-7 are left unscaled.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import MergeError

SPARSIFIERS = ("magnitude", "magnitude_outliers", "random", "della_magprune")
_RESCALE_EPS = 1e-7


def host(t: torch.Tensor) -> torch.Tensor:
    """`t` itself on the CPU, else a CPU copy: where a result must not depend on the device."""
    return t if t.device.type == "cpu" else t.cpu()


def div_exact(x: torch.Tensor, n: float) -> torch.Tensor:
    """x / n with a true division on every device. A CUDA division by a Python number multiplies
    by its reciprocal (a float32 `avg / 3` then differs from the CPU's in a third of the elements);
    by a tensor on the same device it divides, as the CPU does."""
    return x / torch.tensor(n, dtype=x.dtype, device=x.device)


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread meanwhile: a CPU sum over more than torch's grain (32 768 elements) is
    split over its threads and the partial sums added, so a float32 sum of the same tensor differs
    in the last bits between 1, 2 and 16 threads, and so would a coefficient taken from it, on
    machines with other core counts. One thread adds in torch's sequential (vectorised) order.
    OpenMP's thread count is per calling thread: other threads are not affected."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def host_sort_indices(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """Indices of `values` (1-D) in sorted order, computed on the CPU whatever the device.

    Fine-tunes stored in bf16 have few distinct magnitudes (about 2 000 among 3 M entries), so many
    entries tie at a trim's threshold and the sort's tie order decides which of them are kept.
    torch's CPU sort is unstable but deterministic (the same order for the same values, whatever the
    thread count) and is the order mergekit gets on CPU; a CUDA sort breaks ties differently (TIES
    on CUDA kept other entries in 39 of 39 tensors). Sorting on the CPU makes the kept set, and so
    the output bytes, the same on every device. The indices stay on the CPU.
    """
    return torch.sort(host(values), descending=descending).indices


def rescale_l1(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` scaled to ‖tau‖₁ (float32 sums, as mergekit); unscaled when either norm is ~0."""
    # Summed on the CPU on one thread: a GPU reduction, or more threads, add in another order.
    with single_threaded():
        before = host(tau).abs().sum()
        after = host(kept).abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after).to(kept.device)


def _finish(tau: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    # Contiguous, so the ‖·‖₁ sums (and so the rescale) do not depend on the input's strides.
    tau = tau.contiguous()
    kept = tau * mask.reshape(tau.shape)
    return rescale_l1(tau, kept) if rescale else kept


def magnitude(tau: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: the max(1, ⌊density·n⌋) largest magnitudes (density ≥ 1: a copy)."""
    if density >= 1.0:
        return tau.clone()
    n = tau.numel()
    if n == 0:
        return tau.clone()
    k = max(1, int(density * n))
    order = host_sort_indices(tau.abs().reshape(-1).float(), descending=True)[:k]
    mask = torch.zeros(n, dtype=tau.dtype)
    mask[order] = 1
    return _finish(tau, mask.to(tau.device), rescale)


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the ⌊γ·n⌋ largest magnitudes, keep the next ⌊density·n⌋ (density ≥ 1: a copy)."""
    if density >= 1.0:
        return tau.clone()
    n = tau.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    order = host_sort_indices(tau.abs().reshape(-1).float(), descending=False)
    mask = torch.zeros(n, dtype=tau.dtype)
    mask[order[bottom:bottom + keep]] = 1
    return _finish(tau, mask.to(tau.device), rescale)


def random(tau: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE drop: a Bernoulli(density) mask from `generator` (density ≥ 1: `tau` itself, no draw)."""
    if density >= 1.0:
        return tau
    mask = torch.empty(tau.shape, dtype=tau.dtype, device=tau.device)
    mask.bernoulli_(density, generator=generator)
    return _finish(tau, mask, rescale)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities: density − ε + 2ε·(rank − min)/(max − min) per row (rank of |τ|, 1-based)."""
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    # A one-column row has hi == lo: 0/0, clamped like mergekit's NaN-free path would need; take density − ε.
    norm = torch.nan_to_num((ranks - lo) / (hi - lo), nan=0.0).clamp(0, 1)
    return (density - epsilon) + norm * (2 * epsilon)


def check_della(method: str, density: float, epsilon: float) -> None:
    if density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise MergeError(
            f"Method {method!r}: density ± epsilon must stay inside (0, 1), got density {density} "
            f"and epsilon {epsilon}.",
            hint="Lower epsilon (default 0.15) or move density away from 0 and 1.")


def della_magprune(tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                   rescale: bool = True, method: str = "della") -> torch.Tensor:
    """DELLA MagPrune: Bernoulli mask with rank-dependent probabilities (density ≥ 1: `tau` itself)."""
    if density >= 1.0:
        return tau
    check_della(method, density, epsilon)
    probs = della_probabilities(tau, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator).to(tau.dtype)
    return _finish(tau, mask, rescale)
