"""mergekit's arithmetic: each shared method's steps in the recipe's `dtype`, in mergekit 0.1.5's order.

mergekit casts every input tensor to the recipe's `dtype` and computes in it; in bfloat16 or
float16 most steps round, so the float64/float32 sums of our own path give other bits. A mergekit
recipe therefore sets `mergekit_order: <dtype>` on its method (`mergekit_recipe.py`;
`--arithmetic own` turns it off, `--arithmetic mergekit` turns it on for our own recipes) and the
engine hands the method the inputs cast to that dtype (`MethodKernel.merge_models`). The steps
below were worked out from the methods' definitions and fixed by comparing with mergekit 0.1.5's
outputs element for element (`bench/mergekit_agreement.py`, `tests/methods/test_mergekit_order.py`); no
code of mergekit is used or copied.

Notation: θ0 the base and θt the models, already in dtype `d`; ⊖ ⊙ ⊘ ⊕ are one elementwise step
rounded to `d`; Σ over the models accumulates in float32 in model order and rounds once (what
torch's reduction over a stacked dimension does on the CPU).

- task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*):
  τt = θt ⊖ θ0; τ̃t = sparsify(τt) (in `d`); w the weights as a `d` tensor; ωt = τ̃t ⊙ wt;
  with sign consensus mt = [sign ωt = sign Σt ωt] (a sum ≥ 0 elects +), else mt = 1;
  δ = Σt ωt·mt and D = Σt wt·mt (D = 0 → 1; without consensus |D| < 1e-8 → 1);
  δ ← δ ⊘ D with normalize; δ ← δ ⊙ λ when λ ≠ 1; merged = θ0 ⊕ δ.
- linear: in float32 whatever `d` (the weights are a float32 tensor, which promotes the products):
  w1·θ1, then + wt·θt as one fused multiply-add per model, then ÷ Σ wt.
- slerp: SLERP of the two `d` inputs in float32 (`interpolation.slerp`), rounded once.
- nuslerp: its formula (`nuslerp.py`) step by step in `d`.
- karcher: its iteration (`karcher.py`) step by step in `d`.
- arcee_fusion: δ and the importance in `d`, the mask in float32 (`arcee_fusion.py`): θ0 + mask·δ is
  float32 for half-precision inputs.
- model_stock (`ModelStock.mergekit_merge`): τt = θt ⊖ θ0, the pairwise cosines, t = N·cos/(1 + (N−1)·cos), the average
  ((θ1 ⊕ θ2) ⊕ ...) ⊘ N and t ⊙ avg ⊕ (1 ⊖ t) ⊙ θ0, all in `d`.
- sce (`SCE.mergekit_merge`): τt in `d`; the variance top-k mask and the shares wt = mean(τt²)/Σk mean(τk²) in `d`;
  mt = [sign τt = sign Σt τt]; merged = θ0 ⊕ (Σt τt·(wt·mt)) ⊘ max(Σt wt·mt, 1e-6).

Reductions over a whole tensor (norms, cosines, ‖·‖₁ of a rescale, a variance's top-k) are taken
on CPU copies and sums over the models are elementwise in model order, so a GPU gives the CPU's
bytes (`sparsify.host`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import MergeError
from ..dtype_names import CONFIG_TO_ST
from ..safetensors_io import ST_TO_TORCH
from .settings import first_set

if TYPE_CHECKING:
    from .base import MergeMethod

#: names a recipe may give `mergekit_order` (True: float32, its first form; "auto": the inputs' dtype,
#: what mergekit computes in when a recipe gives no `dtype`)
DTYPES = {name: ST_TO_TORCH[code] for name, code in CONFIG_TO_ST.items()}


#: our methods that have mergekit's arithmetic (`dare` is our alias of dare_linear)
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "dare", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "sce", "nuslerp",
           "karcher", "arcee_fusion")


def parse_order(method: str, value: Any) -> str | None:
    """`mergekit_order` as a dtype name or "auto" (None: our own arithmetic)."""
    if value is False or value is None:
        return None
    if value is True:
        return "float32"
    if value in DTYPES or value == "auto":
        return value
    raise MergeError(f"Method {method!r}: mergekit_order must be false, auto or one of {', '.join(DTYPES)}, "
                     f"got {value!r}.",
                     hint="mergekit_order computes as mergekit does in that dtype (mergekit recipes set it).")


def compute_dtype(method: MergeMethod, stored: Sequence[torch.dtype] = ()) -> torch.dtype | None:
    """The dtype a method computes in with mergekit's arithmetic (None: ours). "auto" promotes the
    inputs' stored dtypes, as mergekit's arithmetic on uncast tensors does."""
    name = method.mergekit_order
    if not isinstance(name, str):
        return None
    if name != "auto":
        return DTYPES[name]
    out = None
    for dt in stored:
        if dt.is_floating_point:
            out = dt if out is None else torch.promote_types(out, dt)
    return out or torch.float32


def model_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over the models, elementwise in model order in float32, rounded once to their dtype."""
    acc = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        acc.add_(p)
    return acc.to(parts[0].dtype)


def _weights(values: Sequence[float], like: torch.Tensor) -> list[torch.Tensor]:
    """Each weight as a 0-d tensor of `like`'s dtype (rounded as mergekit's weight tensor is)."""
    w = torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
    return list(w.unbind())


def task_arithmetic_family(m: Any, base: torch.Tensor, models: list[torch.Tensor], ctx: Any,
                           sparsify: Callable[[torch.Tensor, int, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The task-arithmetic family in `base.dtype` (see the module docstring); `sparsify(τ, i, ctx)`
    trims or drops each task vector first (TIES, DARE, Breadcrumbs, DELLA)."""
    taus = [t - base for t in models]
    if sparsify is not None:
        taus = [sparsify(tau, i, ctx) for i, tau in enumerate(taus)]
    w = _weights(m.tensor_weights(len(taus), ctx), base)
    weighted = [tau * wt for tau, wt in zip(taus, w)]
    if m.consensus:
        masks = consensus_masks(weighted, m.majority_sign_method)
        mixed = model_sum([x * k for x, k in zip(weighted, masks)])
        divisor = model_sum([wt * k for wt, k in zip(w, masks)])
        divisor[divisor == 0] = 1
    else:
        mixed = model_sum(weighted)
        divisor = model_sum(w)
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if m.normalize:
        mixed = mixed / divisor
    lam = m.tensor_lambda(ctx)
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def consensus_masks(weighted: list[torch.Tensor], sign_method: str) -> list[torch.Tensor]:
    """Per model, the entries whose sign is the elected one: that of Σt ωt ("total") or of
    Σt sign ωt ("frequency"), a sum ≥ 0 electing +; zeros never agree."""
    signs = [x.sign() for x in weighted]
    votes = model_sum(weighted if sign_method == "total" else signs)
    elected = (votes >= 0).to(weighted[0].dtype) * 2 - 1
    return [s == elected for s in signs]


def linear(m: Any, models: list[torch.Tensor], ctx: Any) -> torch.Tensor:
    """Σt wt θt (÷ Σt wt with normalize) in float32 (see the module docstring)."""
    w = [float(first_set(ctx, x, default=1.0)) for x in m.weights] if m.weights is not None else [1.0] * len(models)
    models = [t.float() for t in models]
    res = models[0] * w[0]
    for t, x in zip(models[1:], w[1:]):
        res = res.add(t, alpha=x)
    if m.normalize:
        res = res / torch.tensor(w, dtype=torch.float32).sum().to(res.device)
    return res


def merge(m: Any, base: torch.Tensor, models: list[torch.Tensor], ctx: Any) -> torch.Tensor:
    """The merged tensor of method `m` with mergekit's arithmetic, from inputs already in its dtype
    (each method's `mergekit_merge` calls its steps here)."""
    return m.mergekit_merge(base, models, ctx)
