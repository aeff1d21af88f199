"""`--output-format lora`: the merge written as one exact LoRA adapter (rank Σ r) instead of full shards."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeError
from ..methods.base import MergeMethod
from ..sources.lora import ADAPTER_WEIGHTS, ENERGY_FILE, LORA_OUTPUT_METHODS, PREFIX
from .executor import Executor, _Coefficients, _progress
from .merging import MethodKernel
from .pieces import Piece, split_group
from .plan import MergePlan
from .schedule import reduce_steps


def check_lora_output(plan: MergePlan, method: MergeMethod) -> None:
    """`--output-format lora` needs LoRA adapters only, one base, and a method that adds scaled τ."""
    plain = [m.name for m in plan.models if not m.ref.is_adapter]
    if plain:
        raise MergeError(f"--output-format lora needs every input to be a LoRA adapter; {plain[0]} is a full model.",
                         hint="Use the default --output-format model to merge adapters with full fine-tunes.")
    if method.name not in LORA_OUTPUT_METHODS or (method.name == "linear" and not getattr(method, "normalize", True)):
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


class AdapterOutput(Executor):
    """Writes one exact adapter (rank Σ rt per module) instead of full shards.

    Norms come from the r×r identity (pass 1 reads the adapters only); the factors of one stream
    group are read again and stacked. Modules some input saves in full (modules_to_save) are
    merged like the full output (`MethodKernel`) and saved as modules_to_save.
    """

    def __init__(self, plan: MergePlan, method: MergeMethod, work_dir: Path, *, lora_rank: int | None = None,
                 **kwargs: Any) -> None:
        check_lora_output(plan, method)
        super().__init__(plan, method, work_dir, **kwargs)
        self.lora_rank = lora_rank
        self.energy: dict[str, float] = {}
        self.full = MethodKernel(self.kernel.ctx)

    def _run(self) -> None:
        start = time.perf_counter()
        if self.method.uses_group_norms and not self.ledger.known(self.plan.norm_groups):
            self.stats.passes = 2
            infos = self._pooled_infos()
            pieces = [split_group(g, infos, self.unit, slabs=self.kernel.slabs) for g in self.plan.groups]
            self._reduce_pass(reduce_steps(self.plan, pieces))
        self.coefficients = {g: self._coefficients(g) for g in self.plan.norm_groups}
        self._write_adapter()
        self.stats.seconds = time.perf_counter() - start

    def _write_adapter(self) -> None:
        from peft import LoraConfig
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        saved: list[str] = []
        coefs = _Coefficients(self)
        for group in _progress(self.plan.groups, "write adapter", self.progress):
            floating = [t for t in group.tensors if t.floating]
            raws = self._read(Piece.whole(group), with_base=False)
            for tp in floating:
                coeffs = self.coefficients[tp.norm_group]
                if any(tp.name in s.info.full for s in self.sources):
                    if raws[0] is None:
                        raws[0] = self._read_base(Piece.whole(group))
                    tensors[PREFIX + tp.name] = self.full.merge_tensor(tp, raws, coefs).contiguous()
                    saved.append(tp.name[: -len(".weight")] if tp.name.endswith(".weight") else tp.name)
                    continue
                parts = [(c, s.factors(tp, raw, torch.float32, self.device))
                         for c, s, raw in zip(coeffs, self.sources, raws[1:]) if tp.name in s.info.lora]
                if not parts:
                    continue
                # Σt ct·Δt = Σt (ct·st·Bt)·At: B columns scaled, ranks stacked; scaling 1 (alpha = r).
                b = torch.cat([bt * (c * m.scale) for c, (bt, _, m) in parts], dim=1)
                a = torch.cat([at for _, (_, at, _) in parts], dim=0)
                if self.lora_rank is not None and b.shape[1] > self.lora_rank:
                    b, a, kept = truncate_rank(b, a, self.lora_rank)
                    self.energy[tp.name] = kept
                elif self.lora_rank is not None:
                    self.energy[tp.name] = 1.0
                m0 = parts[0][1][2]
                tensors[m0.a_key] = a.contiguous().cpu()
                tensors[m0.b_key] = b.contiguous().cpu()
                ranks[m0.module] = a.shape[0]
            del raws
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
        self.stats.bytes_written = out.stat().st_size
        if self.lora_rank is not None:
            (self.work_dir / ENERGY_FILE).write_text(json.dumps(
                {"lora_rank": self.lora_rank, "retained_energy": self.energy}, indent=2))


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

    from ..sources.local import TOKENIZER_FILES

    src = plan.inputs[plan.tokenizer_source].ref.local_path
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, work / name)


def energy_note(energy: dict[str, float], k: int) -> str | None:
    if not energy:
        return None
    worst = min(energy, key=energy.get)  # type: ignore[arg-type]
    mean = sum(energy.values()) / len(energy)
    return (f"--lora-rank {k}: retained energy mean {mean:.4f}, lowest {energy[worst]:.4f} ({worst}); "
            f"per module in {ENERGY_FILE}")
