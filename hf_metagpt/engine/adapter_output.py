"""`--output-format lora`: the merge written as one exact LoRA adapter (rank Σ r) instead of full shards."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import MergeError
from ..methods.base import MergeMethod
from ..sources.lora import ADAPTER_WEIGHTS, ENERGY_FILE, LORA_OUTPUT_METHODS, PREFIX
from .merging import Coefficients, MergeKernel, MethodKernel, Raws, Records
from .pieces import Piece
from .plan import MergePlan, TensorPlan
from .schedule import Step
from .sinks import Alloc, fresh
from .timeline import Meter


def check_lora_output(plan: MergePlan, method: MergeMethod) -> None:
    """`--output-format lora` needs LoRA adapters only, one base, and a method that adds scaled τ."""
    plain = [m.name for m in plan.models if not m.ref.is_adapter]
    if plain:
        raise MergeError(f"--output-format lora needs every input to be a LoRA adapter; {plain[0]} is a full model.",
                         hint="Use the default --output-format model to merge adapters with full fine-tunes.")
    if method.name not in LORA_OUTPUT_METHODS or (method.name == "linear" and not method.params().get("normalize", True)):
        raise MergeError(f"--output-format lora cannot express method {method.name!r} exactly as one adapter.",
                         hint=f"Use one of {', '.join(LORA_OUTPUT_METHODS)} (linear with normalize), "
                              f"or the default --output-format model.")
    fifo = {bool(m.peft_config.fan_in_fan_out) for m in plan.models}  # type: ignore[attr-defined]
    if len(fifo) > 1:
        raise MergeError("--output-format lora: the adapters disagree on fan_in_fan_out.")
    for tp in plan.tensors:
        if tp.shared_rows is not None:
            raise MergeError(f"--output-format lora: the adapters' vocabularies differ ({tp.name}).",
                             hint="Use the default --output-format model, which applies the vocabulary policy.")


@dataclass(frozen=True)
class AdapterPart:
    """One module of the merged adapter: stacked factors (`a_key`, `b_key`), or a tensor saved whole."""

    module: str
    tensors: dict[str, torch.Tensor]
    #: the stacked rank (None: a module saved whole, modules_to_save)
    rank: int | None = None
    #: share of ‖B·A‖² kept by the rank cut (None: no --lora-rank)
    energy: float | None = None


class AdapterKernel(MergeKernel):
    """Merges LoRA adapters into one exact adapter: Σt ct·Δt = Σt (ct·st·Bt)·At, ranks stacked.

    Norms come from the kernel `choose_kernel` picks for the adapters (`inner`: exact from the
    factors, r×r). Modules some input saves in full (modules_to_save) are merged like the full
    output (`MethodKernel`) and saved as modules_to_save. `merge` returns an `AdapterPart` (or
    None) per tensor, for `AdapterSink`.
    """

    slabs = False
    fused = True  # every norm group is reduced by `reduce` before its tensors merge

    def __init__(self, inner: MergeKernel, lora_rank: int | None = None) -> None:
        super().__init__(inner.ctx)
        self.inner = inner
        self.full = MethodKernel(inner.ctx)
        self.lora_rank = lora_rank
        self.threaded = inner.threaded
        self.precision = inner.precision
        self.reduce_reads_base = inner.reduce_reads_base
        self.stager = inner.stager
        # the base's weights only for modules saved whole (merged through the method path)
        self.merge_reads_base = any(s.saves_whole_tensors for s in inner.ctx.sources)

    def reduce(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece,
               read_base: Callable[[], dict[str, torch.Tensor]]) -> Records:
        return self.inner.reduce(tensors, raws, piece, read_base)

    def merge(self, tensors: Sequence[TensorPlan], raws: Raws, piece: Piece, coefs: Coefficients,
              alloc: Alloc = fresh) -> list:
        return [self.part(tp, raws, coefs) if tp.floating else None for tp in tensors]

    def part(self, tp: TensorPlan, raws: Raws, coefs: Coefficients) -> AdapterPart | None:
        sources = self.ctx.sources
        if any(tp.name in s.info.full for s in sources):  # type: ignore[attr-defined]
            module = tp.name[: -len(".weight")] if tp.name.endswith(".weight") else tp.name
            return AdapterPart(module, {PREFIX + tp.name: self.full.merge_tensor(tp, raws, coefs).contiguous()})
        coeffs = coefs(tp.norm_group)
        parts = [(c, s.factors(tp, raw, torch.float32, self.ctx.device))  # type: ignore[attr-defined]
                 for c, s, raw in zip(coeffs, sources, raws[1:]) if tp.name in s.info.lora]  # type: ignore[attr-defined]
        if not parts:
            return None
        # Σt ct·Δt = Σt (ct·st·Bt)·At: B columns scaled, ranks stacked; scaling 1 (alpha = r).
        b = torch.cat([bt * (c * m.scale) for c, (bt, _, m) in parts], dim=1)
        a = torch.cat([at for _, (_, at, _) in parts], dim=0)
        energy = None
        if self.lora_rank is not None and b.shape[1] > self.lora_rank:
            b, a, energy = truncate_rank(b, a, self.lora_rank)
        elif self.lora_rank is not None:
            energy = 1.0
        m0 = parts[0][1][2]
        return AdapterPart(m0.module, {m0.a_key: a.contiguous().cpu(), m0.b_key: b.contiguous().cpu()},
                           rank=a.shape[0], energy=energy)


class AdapterSink:
    """Collects the merged adapter's modules and writes the adapter (config, weights, energy) at the end.

    Modules are put together in plan order whatever order the steps ran in, so the files are the
    same for every schedule.
    """

    writes = True

    def __init__(self, plan: MergePlan, work_dir: Path, lora_rank: int | None = None) -> None:
        self.plan = plan
        self.work_dir = work_dir
        self.lora_rank = lora_rank
        self.bytes_written = 0
        self.energy: dict[str, float] | None = None
        self._parts: dict[str, AdapterPart] = {}
        self.busy = Meter()  # (written on the main thread in `finish`: the executor's sink wait)
        self.sync = Meter()

    def finished(self) -> set[int]:
        return set()  # one file, written at the end: nothing to resume

    def open(self) -> None:
        pass

    def alloc(self, step: Step) -> Alloc:
        return fresh

    def write(self, step: Step, outs: list, ledger: dict | None) -> None:
        for tp, part in zip(step.write, outs):
            if part is not None:
                self._parts[tp.name] = part

    def abort(self) -> None:
        self._parts.clear()

    def finish(self, ledger: dict | None) -> None:
        from peft import LoraConfig
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        saved: list[str] = []
        energy: dict[str, float] = {}
        for tp in self.plan.tensors:
            part = self._parts.get(tp.name)
            if part is None:
                continue
            tensors.update(part.tensors)
            if part.rank is None:
                saved.append(part.module)
                continue
            ranks[part.module] = part.rank
            if part.energy is not None:
                energy[tp.name] = part.energy
        if not ranks and not saved:
            raise MergeError("The adapters update nothing: the merged adapter would be empty.")
        first = self.plan.models[0].peft_config  # type: ignore[attr-defined]
        common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
        # Exact scaling 1 everywhere: alpha = r per module. Pattern keys are escaped module names
        # (peft reads them as regexes anchored at the end) so each matches its own module only.
        pattern = {re.escape(mod): r for mod, r in ranks.items() if r != common}
        cfg = LoraConfig(
            r=common, lora_alpha=common, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
            target_modules=sorted(ranks) or None, modules_to_save=saved or None,
            fan_in_fan_out=bool(first.fan_in_fan_out), lora_dropout=0.0, bias="none",
            base_model_name_or_path=first.base_model_name_or_path or self.plan.base.ref.pinned,
            task_type=first.task_type, inference_mode=True,
        )
        cfg.save_pretrained(str(self.work_dir))
        out = self.work_dir / ADAPTER_WEIGHTS
        save_file(tensors, str(out) + ".tmp", metadata={"format": "pt"})
        Path(str(out) + ".tmp").replace(out)
        self.bytes_written = out.stat().st_size
        if self.lora_rank is not None:
            self.energy = energy
            (self.work_dir / ENERGY_FILE).write_text(json.dumps(
                {"lora_rank": self.lora_rank, "retained_energy": energy}, indent=2))


def truncate_rank(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of B·A (truncated SVD, float64) and the share of ‖B·A‖² kept.

    Works on R×R matrices only: B = Qb·Rb and Aᵀ = Qa·Ra give B·A = Qb·(Rb·Raᵀ)·Qaᵀ, whose SVD is
    that of the small middle matrix.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    total = float((s * s).sum())
    kept = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    new_b = (qb @ u[:, :k]) * s[:k]
    new_a = vh[:k] @ qa.t()
    return new_b.to(b.dtype), new_a.to(a.dtype), kept


def write_adapter_side_files(plan: MergePlan, work: Path) -> None:
    """Tokenizer files of the tokenizer source beside the merged adapter (when it has any)."""
    import shutil

    from .workdir import tokenizer_files

    for name, src in tokenizer_files(plan):
        shutil.copyfile(src, work / name)


def energy_note(energy: dict[str, float], k: int) -> str | None:
    if not energy:
        return None
    worst = min(energy, key=energy.get)  # type: ignore[arg-type]
    mean = sum(energy.values()) / len(energy)
    return (f"--lora-rank {k}: retained energy mean {mean:.4f}, lowest {energy[worst]:.4f} ({worst}); "
            f"per module in {ENERGY_FILE}")
