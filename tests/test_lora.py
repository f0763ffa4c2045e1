"""Per-request LoRA (engine.lora) against peft's own PeftModel on tiny random models of both families."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from engine import kernels
from engine.config import ModelConfig
from engine.errors import AdapterMismatch
from engine.kv_cache import KVCache
from engine.lora import BatchLora, load_adapter, merge_adapter
from engine.model import GPT

peft = pytest.importorskip("peft")

LLAMA = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
GPT2 = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def _make_adapter(base: GPT, folder, *, seed: int, r: int = 8, alpha: int = 16, targets=None, rslora=False,
                  base_name="tiny", base_sha="abc") -> torch.nn.Module:
    """Save a random PEFT adapter for ``base`` into ``folder`` and return the PeftModel (on a copy of base)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_TARGETS, init_lora_weights=False,
                          use_rslora=rslora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(folder))
    (folder / "scratchchat.json").write_text(json.dumps({"base": base_name, "base_sha256": base_sha}))
    return pm


def _served(base: GPT) -> GPT:
    """A frozen copy, as the registry serves it: q/k/v and gate/up run fused and the hook adapts each group at once."""
    return copy.deepcopy(base).requires_grad_(False)


@pytest.fixture(params=["kernels", "matmuls"])
def lora_path(request, monkeypatch):
    """Our kernels (the lora op, also for prompts), or PyTorch's matmuls (training, or a CPU without the kernels)."""
    if request.param == "matmuls":
        monkeypatch.setenv("SCRATCHCHAT_KERNELS", "off")
        kernels.available.cache_clear()
    else:
        assert kernels.available()
    yield request.param
    monkeypatch.delenv("SCRATCHCHAT_KERNELS", raising=False)
    kernels.available.cache_clear()


@pytest.mark.parametrize("frozen", [False, True], ids=["per-projection", "fused-groups"])
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_mixed_batch_matches_peft(tmp_path, config, frozen, lora_path):
    base = _base(config)
    pa = _make_adapter(base, tmp_path / "a", seed=1)
    pb = _make_adapter(base, tmp_path / "b", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                       rslora=True)
    ad_a = load_adapter(tmp_path / "a", config, base_name="tiny", base_sha256="abc")
    ad_b = load_adapter(tmp_path / "b", config, base_name="tiny", base_sha256="abc")
    assert ad_a.rank == 8 and ad_b.rank == 4 and len(ad_b.weights) == 2 * 3

    torch.manual_seed(5)
    idx = torch.randint(0, config.vocab_size, (3, 10))
    with torch.no_grad():
        want = torch.cat([pa(idx[0:1]), base(idx[1:2]), pb(idx[2:3])])
        hook = BatchLora([ad_a, None, ad_b])
        if frozen:
            base = _served(base)
        got = base(idx, lora=hook)
        # the adapters really change the output, and row 1 is untouched
        assert (pa(idx[0:1]) - base(idx[0:1])).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the same through a KV cache: prefill 7 tokens, then decode 3 one by one
    cache = KVCache.build(config, 3, 16)
    with torch.no_grad():
        steps = [base(idx[:, :7], cache=cache, lora=hook)]
        for t in range(7, 10):
            steps.append(base(idx[:, t : t + 1], cache=cache, lora=hook))
    torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-5, atol=1e-5)


def test_shared_adapter_path_and_empty_hook(tmp_path):
    base = _base(LLAMA)
    pa = _make_adapter(base, tmp_path / "a", seed=1)
    ad = load_adapter(tmp_path / "a", LLAMA)
    idx = torch.randint(0, LLAMA.vocab_size, (2, 6))
    hook = BatchLora([ad, ad])
    assert hook.shared and not hook.stacked
    with torch.no_grad():
        torch.testing.assert_close(base(idx, lora=hook), pa(idx), rtol=1e-5, atol=1e-5)
    assert BatchLora([None, None]).is_empty


@pytest.mark.parametrize("frozen", [False, True], ids=["per-projection", "fused-groups"])
def test_merge_equals_unmerged_and_unmerge_is_exact(tmp_path, frozen):
    base = _base(LLAMA)
    _make_adapter(base, tmp_path / "a", seed=1)
    _make_adapter(base, tmp_path / "b", seed=2)
    ad_a, ad_b = load_adapter(tmp_path / "a", LLAMA), load_adapter(tmp_path / "b", LLAMA)
    if frozen:
        base = _served(base)
    idx = torch.randint(0, LLAMA.vocab_size, (3, 8))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        unmerged = base(idx, lora=BatchLora([ad_a, None, ad_b]))
        handle = merge_adapter(base, ad_a)
        merged_a = base(idx[:1])
        # with A merged, a mixed batch still gives each row its own adapter (others subtract A)
        mixed = base(idx, lora=BatchLora([ad_a, None, ad_b], merged=ad_a))
        handle.unmerge()
    torch.testing.assert_close(merged_a, unmerged[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed, unmerged, rtol=1e-4, atol=1e-4)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_merge_matches_peft_merge_bf16(tmp_path):
    base = _base(LLAMA)
    pa = _make_adapter(base, tmp_path / "a", seed=1)
    ad = load_adapter(tmp_path / "a", LLAMA)
    peft_merged = pa.merge_and_unload()
    ours = copy.deepcopy(base).to(torch.bfloat16)
    merge_adapter(ours, ad)
    for k, v in peft_merged.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k].float(), v.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def test_adapter_for_another_base_is_refused(tmp_path):
    base = _base(LLAMA)
    _make_adapter(base, tmp_path / "a", seed=1, base_name="other-base")
    with pytest.raises(AdapterMismatch, match="other-base"):
        load_adapter(tmp_path / "a", LLAMA, base_name="tiny")
    _make_adapter(base, tmp_path / "b", seed=1, base_sha="0" * 64)
    with pytest.raises(AdapterMismatch, match="different version"):
        load_adapter(tmp_path / "b", LLAMA, base_name="tiny", base_sha256="f" * 64)
    # no scratchchat.json: the shape check still catches an adapter for a wider model
    wide = _base(ModelConfig(**{**LLAMA.to_dict(), "d_model": 48, "n_heads": 4, "n_kv_heads": 2}))
    _make_adapter(wide, tmp_path / "c", seed=1)
    (tmp_path / "c" / "scratchchat.json").unlink()
    with pytest.raises(AdapterMismatch, match="lora_A"):
        load_adapter(tmp_path / "c", LLAMA)
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path / "missing", LLAMA)


def test_rank16_adapter_loads_quickly(tmp_path):
    config = ModelConfig.from_name("smollm2-135m", n_layers=30)
    # write a rank-16 all-projection adapter for the real SmolLM2 shapes without building the model
    from safetensors.torch import save_file

    from engine.lora import projection_shapes

    tensors = {}
    for i in range(config.n_layers):
        for proj, (n_in, n_out) in projection_shapes(config).items():
            blk = "attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            tensors[f"base_model.model.blocks.{i}.{blk}.{proj}.lora_A.weight"] = torch.randn(16, n_in)
            tensors[f"base_model.model.blocks.{i}.{blk}.{proj}.lora_B.weight"] = torch.randn(n_out, 16)
    folder = tmp_path / "r16"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                            "target_modules": ALL_TARGETS}))
    t0 = time.perf_counter()
    ad = load_adapter(folder, config)
    elapsed = time.perf_counter() - t0
    assert ad.rank == 16 and len(ad.weights) == 30 * 7
    # a generous bound (the target is 200 ms; tests check correctness, this only catches pathologies)
    assert elapsed < 2.0, elapsed


def test_bf16_base_with_fp32_lora_matches_fp32_reference(tmp_path):
    base = _base(LLAMA)
    pa = _make_adapter(base, tmp_path / "a", seed=1)
    ad = load_adapter(tmp_path / "a", LLAMA)  # float32 A/B, also for a bf16 base
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    base16.rope_cos, base16.rope_sin = base.rope_cos, base.rope_sin
    idx = torch.randint(0, LLAMA.vocab_size, (3, 8))
    with torch.no_grad():
        want = torch.cat([pa(idx[0:1]), base(idx[1:2]), pa(idx[2:3])])
        for hook in (BatchLora([ad, None, ad]), BatchLora([ad, ad, ad])):
            got = base16(idx, lora=hook).float()
            rows = [0, 2] if hook.stacked else [0, 1, 2]
            ref = want if hook.stacked else pa(idx)
            torch.testing.assert_close(got[rows], ref[rows], rtol=0.05, atol=0.05)


def test_bf16_base_serves_bf16_adapter_weights_like_peft_in_bf16(tmp_path, lora_path):
    """For a bf16 base, A and scale * B are rounded to bf16 once at load (the decode op reads bf16 copies, prefill
    the same values in float32) as PEFT keeps them with ``autocast_adapter_dtype=False``: the mixed batch equals
    that PeftModel's rows within bf16 steps, and decode steps through the cache give the prefill's logits."""
    base = _base(LLAMA)
    _make_adapter(base, tmp_path / "a", seed=1)
    ad = load_adapter(tmp_path / "a", LLAMA, dtype=torch.bfloat16)
    assert ad.a_decode.dtype == torch.bfloat16 and ad.b_decode.dtype == torch.bfloat16
    a32, bt32 = ad.weights[(0, "q_proj")]
    assert a32.dtype == torch.float32 and torch.equal(a32, a32.bfloat16().float())  # bf16 values, float32 storage
    assert torch.equal(bt32, bt32.bfloat16().float())
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    base16.rope_cos, base16.rope_sin = base.rope_cos, base.rope_sin
    pm16 = peft.PeftModel.from_pretrained(copy.deepcopy(base16), str(tmp_path / "a"),
                                          autocast_adapter_dtype=False).eval()
    assert pm16.base_model.model.blocks[0].attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16
    torch.manual_seed(3)
    idx = torch.randint(0, LLAMA.vocab_size, (2, 9))
    hook = BatchLora([ad, None])
    with torch.no_grad():
        want = torch.cat([pm16(idx[0:1]), base16(idx[1:2])]).float()
        served = _served(base16)
        got = served(idx, lora=hook).float()
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
        cache = KVCache.build(LLAMA, 2, 16, dtype=torch.bfloat16)
        steps = [served(idx[:, :6], cache=cache, lora=hook)]
        for t in range(6, 9):
            steps.append(served(idx[:, t : t + 1], cache=cache, lora=hook))
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), got, rtol=0.02, atol=0.05)
