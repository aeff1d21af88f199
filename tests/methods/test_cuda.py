"""Same bytes on every device: each deterministic method merged on the CPU and on CUDA.

The CUDA comparisons run where a CUDA GPU is present (the lent GPU machine: `bench/device_check.py`
runs this file there) and skip elsewhere. The CPU tests below pin the choices that make the bytes
device-independent: the TIES trim's tie order is the CPU sort's, and the sign election adds the
models in their order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from hf_metagpt.methods import get_method, sparsify
from hf_metagpt.methods.base import TensorContext
from hf_metagpt.methods.common import keep_majority_sign_

#: (case name, method, parameters, granularity, number of fine-tunes): every deterministic method.
DETERMINISTIC_CASES = [
    ("metagpt-model", "metagpt", {}, "model", 3),
    ("metagpt-layer", "metagpt", {}, "layer", 3),
    ("metagpt-tensor", "metagpt", {}, "tensor", 3),
    ("linear", "linear", {"weights": [0.5, 0.3, 0.2]}, "model", 3),
    ("linear-mergekit", "linear", {"weights": [0.5, 0.3, 0.2], "mergekit_order": True}, "model", 3),
    ("task_arithmetic", "task_arithmetic", {"lambda_": 0.5}, "model", 3),
    ("task_arithmetic-mergekit", "task_arithmetic", {"lambda_": 0.9, "mergekit_order": True}, "model", 3),
    ("ties", "ties", {"density": 0.3}, "model", 3),
    ("ties-weights", "ties", {"density": 0.5, "weights": [1.0, 0.5, 2.0]}, "model", 3),
    ("ties-frequency", "ties", {"density": 0.3, "majority_sign_method": "frequency"}, "model", 3),
    ("metagpt_ties-model", "metagpt_ties", {"density": 0.3}, "model", 3),
    ("metagpt_ties-layer", "metagpt_ties", {"density": 0.3}, "layer", 3),
    ("breadcrumbs", "breadcrumbs", {"density": 0.6, "gamma": 0.05}, "model", 3),
    ("breadcrumbs_ties", "breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}, "model", 3),
    ("ties-rescale", "ties", {"density": 0.3, "rescale": True}, "model", 3),
    ("slerp", "slerp", {"t": 0.3}, "model", 1),
    ("model_stock", "model_stock", {}, "model", 3),
    ("model_stock-filter_wise", "model_stock", {"filter_wise": True}, "model", 3),
    ("sce", "sce", {"select_topk": 0.5}, "model", 3),
    # mergekit's arithmetic in the recipe's dtype (mergekit_order.py)
    ("ties-mergekit-bf16", "ties", {"density": 0.3, "mergekit_order": "bfloat16"}, "model", 3),
    ("breadcrumbs_ties-mergekit-bf16", "breadcrumbs_ties", {"density": 0.6, "gamma": 0.05,
                                                            "mergekit_order": "bfloat16"}, "model", 3),
    ("model_stock-mergekit-f32", "model_stock", {"mergekit_order": "float32"}, "model", 3),
    ("model_stock-mergekit-bf16", "model_stock", {"filter_wise": True, "mergekit_order": "bfloat16"}, "model", 3),
    ("sce-mergekit-bf16", "sce", {"select_topk": 0.5, "mergekit_order": "bfloat16"}, "model", 3),
    ("slerp-mergekit-bf16", "slerp", {"t": 0.3, "mergekit_order": "bfloat16"}, "model", 1),
]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def family(root: Path) -> tuple[Path, list[Path]]:
    """A small bf16 LLaMA family (base + 3 fine-tunes), ~0.9 M parameters."""
    from hf_metagpt.demo.tiny import TinySpec, build_family

    return build_family(root, n_models=3, spec=TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                                        vocab_size=512, max_shard_size="1MB"))


def merge_digest(base: Path, fts: list[Path], out: Path, case: tuple, device: str) -> dict[str, str]:
    """sha256 of every safetensors file of one merge on `device`."""
    import hf_metagpt

    _, method, params, granularity, n = case
    hf_metagpt.merge(base=str(base), models=[str(f) for f in fts[:n]], output=str(out), method=method,
                     parameters=params, granularity=granularity, device=device, progress=False)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("model*.safetensors"))}


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    return family(tmp_path_factory.mktemp("cuda-family"))


@cuda
@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=[c[0] for c in DETERMINISTIC_CASES])
def test_cuda_and_cpu_give_the_same_bytes(tiny_family, tmp_path, case):
    base, fts = tiny_family
    cpu = merge_digest(base, fts, tmp_path / "cpu", case, "cpu")
    gpu = merge_digest(base, fts, tmp_path / "cuda", case, "cuda")
    assert cpu and cpu == gpu


@cuda
def test_trim_keeps_the_cpu_tie_order_on_cuda():
    g = torch.Generator().manual_seed(5)
    tau = (torch.randn(300_000, generator=g) * 1e-3).bfloat16().float()
    for density in (0.2, 0.5):
        assert torch.equal(sparsify.magnitude(tau.cuda(), density).cpu(), sparsify.magnitude(tau, density))
        assert torch.equal(sparsify.magnitude_outliers(tau.cuda(), density, 0.01).cpu(),
                           sparsify.magnitude_outliers(tau, density, 0.01))


# --------------------------------------------------------------------------- CPU: the pinned choices


def test_trim_breaks_ties_in_the_cpu_sort_order():
    """bf16 deltas tie at the threshold; the kept set is torch's CPU argsort's (mergekit's call on CPU),
    which is not the stable order, so the tie order really decides."""
    g = torch.Generator().manual_seed(5)
    tau = (torch.randn(200_000, generator=g) * 1e-3).bfloat16().float()
    mag = tau.abs()
    k = int(0.2 * tau.numel())
    threshold = mag.kthvalue(tau.numel() - k + 1).values
    greater = int((mag > threshold).sum())
    tied = int((mag == threshold).sum())
    assert greater < k < greater + tied  # the threshold's ties must be split
    kept = sparsify.magnitude(tau, 0.2) != 0
    reference = torch.zeros_like(kept)
    reference[torch.argsort(mag, descending=True)[:k]] = True
    assert torch.equal(kept, reference)
    stable = torch.zeros_like(kept)
    stable[torch.argsort(mag, descending=True, stable=True)[:k]] = True
    assert not torch.equal(kept, stable)
    # the same kept set whatever the thread count
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(sparsify.magnitude(tau, 0.2) != 0, kept)
    finally:
        torch.set_num_threads(threads)


def test_division_by_a_number_is_a_true_division():
    """CUDA divides by a Python number through its reciprocal; `div_exact` divides by a same-device
    tensor, which is the CPU's true division (and x·(1/3) is not, in a third of the elements)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, generator=g) * 10
    for n in (3, 7):
        assert torch.equal(sparsify.div_exact(x, n), x / n)
        assert not torch.equal(sparsify.div_exact(x, n), x * (1 / n))
        xb = x.bfloat16()
        assert torch.equal(sparsify.div_exact(xb, n), xb / n)


def test_host_sort_indices_are_on_the_cpu():
    v = torch.tensor([2.0, 1.0, 2.0, 3.0])
    idx = sparsify.host_sort_indices(v, descending=True)
    assert idx.device.type == "cpu"
    assert idx.tolist() == torch.argsort(v, descending=True).tolist()
    assert sparsify.host(v) is v


def test_sign_election_adds_the_models_in_order():
    """float32: (1e8 − 1e8) − 1 = −1 elects −, while (−1e8 − 1) + 1e8 rounds to 0 and elects +:
    the elected sign depends on the order of the sum, and the order is the models' (left to right)."""
    def elect(*values: float) -> list[float]:
        return [float(t) for t in keep_majority_sign_([torch.tensor([v], dtype=torch.float32) for v in values])]

    assert elect(1e8, -1e8, -1.0) == [0.0, -1e8, -1.0]
    assert elect(-1e8, -1.0, 1e8) == [0.0, 0.0, 1e8]
    # peft's election over the stacked models (on the CPU) agrees on both orders
    from peft.utils.merge_utils import calculate_majority_sign_mask

    for values in ((1e8, -1e8, -1.0), (-1e8, -1.0, 1e8)):
        stacked = torch.tensor([[v] for v in values], dtype=torch.float32)
        assert (stacked * calculate_majority_sign_mask(stacked)).flatten().tolist() == elect(*values)
    votes = [float(t) for t in keep_majority_sign_([torch.tensor([-2.0]), torch.tensor([1.0]), torch.tensor([0.5])],
                                                   "frequency")]
    assert votes == [0.0, 1.0, 0.5]


def test_ties_result_follows_the_pinned_trim():
    """A whole TIES merge of tied bf16 deltas: the merged tensor is the disjoint mean of the entries
    the CPU-order trim keeps, computed here independently."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4000, generator=g)
    taus = [(torch.randn(4000, generator=g) * 1e-3).bfloat16().float() for _ in range(3)]
    method = get_method("ties", density=0.3)
    ctx = TensorContext.of("model.layers.0.mlp.up_proj.weight")
    kept = method.transform([t.clone() for t in taus], ctx)
    merged = method.combine(base.clone(), kept, method.coefficients(None, 3), ctx)
    k = int(0.3 * 4000)
    trimmed = []
    for t in taus:
        m = torch.zeros(4000)
        m[torch.argsort(t.abs(), descending=True)[:k]] = 1
        trimmed.append(t * m)
    total = trimmed[0] + trimmed[1] + trimmed[2]
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [(t.sign() == sign).float() for t in trimmed]
    num = sum(t * a for t, a in zip(trimmed, agree))
    den = sum(agree)
    den[den == 0] = 1
    assert torch.equal(merged, base + num / den)


@pytest.mark.parametrize("granularity, unit_mb", [("model", None), ("layer", "0.05"), ("tensor", None)])
def test_gpu_kernel_code_gives_the_cpu_kernel_bytes(tiny_family, tmp_path, monkeypatch, granularity, unit_mb):
    """`GpuFusedKernel` (one upload per piece, one read-back) run on the CPU device: the same bytes
    and λ as `FusedKernel`, slabs and all. On a GPU the test above compares the devices."""
    import hf_metagpt
    from hf_metagpt.engine import merging

    base, fts = tiny_family
    if unit_mb:
        monkeypatch.setenv("HF_METAGPT_UNIT_MB", unit_mb)
    results = {}
    for kind in ("cpu", "gpu-code"):
        if kind == "gpu-code":
            plain = merging.choose_kernel
            monkeypatch.setattr(merging, "choose_kernel", lambda *a: (
                merging.GpuFusedKernel if plain(*a) is merging.FusedKernel else plain(*a)))
        out = tmp_path / kind
        res = hf_metagpt.merge(base=str(base), models=[str(f) for f in fts], output=str(out), granularity=granularity,
                               device="cpu", progress=False)
        results[kind] = ({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("model*.safetensors"))},
                         res.coefficients)
    assert results["cpu"][0] and results["cpu"] == results["gpu-code"]
    assert merging.build_kernel.__module__ == merging.__name__
