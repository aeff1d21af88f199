"""LoRA adapters as fine-tunes, checked against peft's own merge_and_unload and the float64 reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import hf_metagpt
from hf_metagpt.errors import IncompatibleModelsError, InputError, MergeError
from hf_metagpt.engine.adapter_output import truncate_rank
from hf_metagpt.errors import UnsupportedAdapterError
from oracles import lora_sq_norm
from hf_metagpt.demo.tiny import TinySpec, build_family
from reference import assert_within_ulp, load_state, reference_metagpt

SPEC = TinySpec(dtype=torch.float32, max_shard_size="200KB")
# Three adapters that exercise every scaling rule: plain alpha/r, rsLoRA alpha/√r, rank and alpha
# patterns (peft's own key matching), and a full saved module (modules_to_save).
ADAPTERS = {
    "ad_plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "ad_rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    "ad_pattern": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"],
                       rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 12},
                       modules_to_save=["lm_head"]),
}


def _load_base(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def make_adapter(base: Path, folder: Path, seed: int, save_embedding_layers: bool | str = "auto", **cfg) -> Path:
    """A peft LoRA adapter on `base` with random non-zero B (and a perturbed saved lm_head)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load_base(base), LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # peft starts these at zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    return folder


def materialize(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The fine-tune an adapter stands for, by peft's own merge_and_unload."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_load_base(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def materialize64(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The fine-tune an adapter stands for, exactly: peft's merge_and_unload on a float64 copy.

    (In float32, peft's own merge rounds B·A and θ0 + Δ: off from the exact update by up to ~14
    output ulps where Δ and θ0 cancel, so it cannot judge a path that is exact to 1 ulp.)
    """
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_load_base(base), adapter).double().merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, (full,) = build_family(root, n_models=1, spec=SPEC)
    adapters = {n: make_adapter(base, root / n, seed=10 + i, **cfg) for i, (n, cfg) in enumerate(ADAPTERS.items())}
    states = {n: materialize(base, p) for n, p in adapters.items()}
    base_state = load_state(base)
    for st in states.values():  # tied / absent keys: compare on the base's tensor set
        assert set(base_state) <= set(st)
    return dict(root=root, base=base, full=full, adapters=adapters, states=states, base_state=base_state)


def _check_against_reference(out: Path, base_state, ft_states, granularity, result, ulps=4):
    expected, lambdas = reference_metagpt(base_state, [{k: s[k] for k in base_state} for s in ft_states], granularity)
    actual = load_state(out)
    assert sorted(actual) == sorted(expected)
    for name, e in expected.items():
        scale = torch.stack([base_state[name].double().abs()] + [s[name].double().abs() for s in ft_states]).amax(0)
        assert_within_ulp(actual[name], e, torch.float32, ulps=ulps, scale=scale)
    assert set(result.coefficients) == set(lambdas)
    for g, lam in lambdas.items():
        assert result.coefficients[g] == pytest.approx(lam, rel=1e-5, abs=1e-9)


def test_config_scaling_rules_are_peft_s(lora_family):
    from hf_metagpt.sources.lora import load_adapter_info
    from hf_metagpt.sources.refs import parse_ref

    ads = lora_family["adapters"]
    plain = load_adapter_info(parse_ref(str(ads["ad_plain"])))
    assert plain.ref.is_adapter
    m = plain.lora["model.layers.0.self_attn.q_proj.weight"]
    assert (m.rank, m.scale, m.transposed) == (4, 2.0, False)
    rs = load_adapter_info(parse_ref(str(ads["ad_rslora"]))).lora["model.layers.0.mlp.up_proj.weight"]
    assert rs.scale == pytest.approx(4 / math.sqrt(8))
    pat = load_adapter_info(parse_ref(str(ads["ad_pattern"])))
    assert pat.lora["model.layers.1.self_attn.q_proj.weight"].rank == 2
    assert pat.lora["model.layers.1.self_attn.q_proj.weight"].scale == 2.0
    assert pat.lora["model.layers.3.self_attn.q_proj.weight"].scale == 1.0
    assert pat.lora["model.layers.0.self_attn.v_proj.weight"].scale == 3.0
    assert pat.full == {"lm_head.weight": "base_model.model.lm_head.weight"}


def test_rxr_norm_equals_materialized_norm(lora_family):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(lora_family["base"]), lora_family["adapters"]["ad_rslora"])
    checked = 0
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a, b = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
            s = mod.scaling["default"]
            dense = (b.double() @ a.double()) * s
            got = lora_sq_norm(b, a, s)
            assert got == pytest.approx(float((dense * dense).sum()), rel=1e-12)
            assert got == pytest.approx(float(mod.get_delta_weight("default").double().pow(2).sum()), rel=1e-5)
            assert got > 0
            checked += 1
    assert checked == 16  # 4 modules x 4 layers


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_three_adapters_merge_equals_reference_on_materialized_finetunes(lora_family, tmp_path, granularity):
    f = lora_family
    names = list(ADAPTERS)
    out = tmp_path / "merged"
    result = hf_metagpt.merge(base=str(f["base"]), models=[str(f["adapters"][n]) for n in names], output=str(out),
                              granularity=granularity, device="cpu", progress=False)
    _check_against_reference(out, f["base_state"], [f["states"][n] for n in names], granularity, result)
    # Norms: the r×r identity, equal to the norms of the materialized task vectors.
    if granularity == "model":
        for i, n in enumerate(names):
            tau = [(f["states"][n][k].double() - b.double()) for k, b in f["base_state"].items()]
            assert result.sq_norms["model"][i] == pytest.approx(sum(float((t * t).sum()) for t in tau), rel=1e-5)
        assert result.stats.passes == 2
    assert all(r.is_adapter for r in result.models)
    # The adapters' pass-1 reads are their own files only: far less than one full model.
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_mixed_full_finetune_and_two_adapters(lora_family, tmp_path):
    f = lora_family
    out = tmp_path / "mixed"
    models = [str(f["full"]), str(f["adapters"]["ad_plain"]), str(f["adapters"]["ad_pattern"])]
    result = hf_metagpt.merge(base=str(f["base"]), models=models, output=str(out), granularity="layer",
                              device="cpu", progress=False)
    states = [load_state(f["full"]), f["states"]["ad_plain"], f["states"]["ad_pattern"]]
    _check_against_reference(out, f["base_state"], states, "layer", result)
    assert [r.is_adapter for r in result.models] == [False, True, True]
    plan_text = hf_metagpt.plan(base=str(f["base"]), models=models, output="-").describe()
    assert plan_text.count("(LoRA adapter)") == 2


def test_merged_adapter_loaded_with_peft_equals_full_output(lora_family, tmp_path):
    from peft import PeftModel

    f = lora_family
    models = [str(f["adapters"][n]) for n in ADAPTERS]
    full_out, lora_out = tmp_path / "full", tmp_path / "adapter"
    full = hf_metagpt.merge(base=str(f["base"]), models=models, output=str(full_out), device="cpu", progress=False)
    ad = hf_metagpt.merge(base=str(f["base"]), models=models, output=str(lora_out), device="cpu", progress=False,
                          output_format="lora")
    assert ad.coefficients == full.coefficients
    assert not list(lora_out.glob("model-*.safetensors"))
    cfg = json.loads((lora_out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["modules_to_save"] == ["lm_head"]
    # Rank Σ rt per module: layer-1 q_proj has 4 (plain) + 8 (rslora) + 2 (pattern).
    from safetensors import safe_open

    with safe_open(lora_out / "adapter_model.safetensors", "pt") as fh:
        assert fh.get_slice("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").get_shape() == [14, 64]
        assert fh.get_slice("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight").get_shape() == [8, 64]
    merged = PeftModel.from_pretrained(_load_base(f["base"]), lora_out).merge_and_unload().state_dict()
    expected = load_state(full_out)
    for name, e in expected.items():
        torch.testing.assert_close(merged[name], e, atol=2e-7, rtol=1e-6)
    assert (lora_out / "metagpt_coefficients.json").is_file()


def test_lora_rank_compresses_by_truncated_svd(lora_family, tmp_path):
    f = lora_family
    models = [str(f["adapters"][n]) for n in ("ad_plain", "ad_rslora")]
    out = tmp_path / "k4"
    result = hf_metagpt.merge(base=str(f["base"]), models=models, output=str(out), device="cpu", progress=False,
                              output_format="lora", lora_rank=4)
    energy = json.loads((out / "lora_rank_energy.json").read_text())["retained_energy"]
    q = energy["model.layers.0.self_attn.q_proj.weight"]  # rank 4 + 8 = 12 cut to 4
    assert 0.0 < q < 1.0
    assert energy["model.layers.0.self_attn.v_proj.weight"] == 1.0  # rank 4 already
    assert any("--lora-rank 4" in n for n in result.notes)
    # The truncation is the best rank-k approximation: residual energy = the dropped singular values.
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 12, generator=gen, dtype=torch.float64), torch.randn(12, 30, generator=gen, dtype=torch.float64)
    nb, na, kept = truncate_rank(b, a, 5)
    s = torch.linalg.svdvals(b @ a)
    assert nb.shape == (40, 5) and na.shape == (5, 30)
    assert float(((b @ a - nb @ na) ** 2).sum()) == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-9)
    assert kept == pytest.approx(float((s[:5] ** 2).sum() / (s ** 2).sum()), rel=1e-12)


def test_mismatched_base_warns_and_strict_refuses(lora_family, tmp_path):
    import shutil

    f = lora_family
    other = tmp_path / "other_base_adapter"
    shutil.copytree(f["adapters"]["ad_plain"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/a-different-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    args = dict(base=str(f["base"]), models=[str(other), str(f["adapters"]["ad_rslora"])], device="cpu", progress=False)
    result = hf_metagpt.merge(output=str(tmp_path / "warn"), **args)
    assert any("someone/a-different-model" in w for w in result.warnings)
    with pytest.raises(IncompatibleModelsError, match="someone/a-different-model"):
        hf_metagpt.merge(output=str(tmp_path / "strict"), strict=True, **args)
    assert not (tmp_path / "strict").exists()


def test_adapter_of_another_shape_is_refused(lora_family, tmp_path):
    f = lora_family
    wide, _ = build_family(tmp_path / "wide", n_models=0, spec=TinySpec(hidden_size=32, intermediate_size=64,
                                                                       dtype=torch.float32))
    with pytest.raises(IncompatibleModelsError, match="shape"):
        hf_metagpt.merge(base=str(wide), models=[str(f["adapters"]["ad_plain"])], output=str(tmp_path / "o"),
                         device="cpu", progress=False)


def test_unsupported_adapters_are_refused_clearly(lora_family, tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    f = lora_family
    dora = tmp_path / "dora"
    get_peft_model(_load_base(f["base"]), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    ia3 = tmp_path / "ia3"
    get_peft_model(_load_base(f["base"]), IA3Config(target_modules=["k_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"])).save_pretrained(ia3)
    args = dict(base=str(f["base"]), output=str(tmp_path / "o"), device="cpu", progress=False)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        hf_metagpt.merge(models=[str(dora)], **args)
    with pytest.raises(UnsupportedAdapterError, match="IA3 adapter; only LoRA"):
        hf_metagpt.merge(models=[str(ia3)], **args)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((f["adapters"]["ad_plain"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(InputError, match="never unpickles"):
        hf_metagpt.merge(models=[str(pickled)], **args)
    with pytest.raises(InputError, match="base must be a full model"):
        hf_metagpt.merge(base=str(f["adapters"]["ad_plain"]), models=[str(f["full"])], output=str(tmp_path / "o"),
                         device="cpu", progress=False)
    with pytest.raises(MergeError, match="every input to be a LoRA adapter"):
        hf_metagpt.merge(models=[str(f["full"]), str(f["adapters"]["ad_plain"])], output_format="lora", **{
            k: v for k, v in args.items()})


def test_cli_merges_adapters_into_one_adapter(lora_family, tmp_path, capsys):
    from hf_metagpt.cli import main

    f = lora_family
    out = tmp_path / "cli"
    rc = main(["-q", "merge", "--base", str(f["base"]), str(f["adapters"]["ad_plain"]), str(f["adapters"]["ad_rslora"]),
               "--output", str(out), "--output-format", "lora", "--lora-rank", "6", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter_config.json").is_file() and (out / "lora_rank_energy.json").is_file()
    assert "output_format: lora" in (out / "hf_metagpt_recipe.yaml").read_text()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")  # an adapter is loaded with peft, and its card says so
    assert card.data.library_name == "peft" and "AutoPeftModelForCausalLM.from_pretrained" in card.text


def test_transforming_method_forms_adapter_task_vectors(lora_family, tmp_path):
    # DARE at density 1 keeps every entry: the same merge as MetaGPT, but through the path that
    # forms Δ and takes norms of the (transformed) task vectors instead of the r×r identity.
    f = lora_family
    models = [str(f["adapters"][n]) for n in ("ad_plain", "ad_pattern")]
    exact = hf_metagpt.merge(base=str(f["base"]), models=models, output=str(tmp_path / "a"), device="cpu",
                             progress=False)
    formed = hf_metagpt.merge(base=str(f["base"]), models=models, output=str(tmp_path / "b"), device="cpu",
                              progress=False, method="metagpt_dare", parameters={"density": 1.0})
    assert formed.sq_norms["model"] == pytest.approx(exact.sq_norms["model"], rel=1e-5)
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_plain_adapters_merge_as_stacked_low_rank_products_in_slabs(lora_family, tmp_path, monkeypatch, granularity):
    """Adapters without saved modules: c0·θ0 + [w·s·B]·[A] per block of rows, never a full-size τ;
    an embedding LoRA (Δ = (B·A)ᵀ) included, the base cut into row slabs and jobs."""
    from hf_metagpt.engine import kernels, merging
    from hf_metagpt.constants import UNIT_ENV

    f = lora_family
    emb = f["root"] / "ad_embed"
    if not emb.exists():
        make_adapter(f["base"], emb, seed=20, r=4, lora_alpha=8, target_modules=["embed_tokens", "down_proj"],
                     save_embedding_layers=False)  # the factors only (no saved full embedding)
    adapters = [f["adapters"]["ad_plain"], f["adapters"]["ad_rslora"], emb]
    states = [materialize64(f["base"], a) for a in adapters]
    assert states[0]["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float64
    calls = []
    real = kernels.base_plus_lowrank
    monkeypatch.setattr(kernels, "base_plus_lowrank", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    monkeypatch.setattr(merging, "JOB", 500)  # 8 rows of 64 a job
    monkeypatch.setenv(UNIT_ENV, "0.01")  # 10 KiB: the 32 KiB float32 embedding in 4 slabs
    out = tmp_path / "merged"
    result = hf_metagpt.merge(base=str(f["base"]), models=[str(a) for a in adapters], output=str(out),
                              granularity=granularity, device="cpu", progress=False)
    # Exact: within 1 float32 ulp of the float64 merge of the exactly materialized fine-tunes.
    _check_against_reference(out, f["base_state"], states, granularity, result, ulps=1)
    assert [True] in calls and [False] in calls  # the embedding's transposed product and the others
    assert result.stats.largest_read <= int(0.01 * (1 << 20))
