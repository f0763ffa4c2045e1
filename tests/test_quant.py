"""Int8 weight-only decode (engine.quant): the grid, the kernel against a float32 reference, one model for one row
and many (cached == uncached, batched == single), merge/unmerge on the grid, clear errors, and the real SmolLM2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine import kernels
from engine.config import ModelConfig
from engine.generate import generate_tokens, generate_uncached
from engine.kv_cache import KVCache
from engine.lora import BatchLora
from engine.model import GPT
from engine.quant import default_quant, int8_linear, is_quantized, quantize_int8_, quantize_rows
from engine.registry import Registry
from engine.requests import Request
from engine.sampling import GenerationConfig
from engine.scheduler import Scheduler
from weights import store

LLAMA = ModelConfig(vocab_size=257, context_length=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
GPT2 = ModelConfig(vocab_size=257, context_length=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256)
NO_EOS = {"type": "none", "eos_token_ids": []}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_model(cfg: ModelConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # larger than GPT-2's init, so that greedy tokens depend on the prompt
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, cfg, seed in (("tiny-llama", LLAMA, 0), ("tiny-gpt2", GPT2, 1)):
        store.add_model(name, cfg.to_dict(), _random_model(cfg, seed).state_dict(), tokenizer=NO_EOS,
                        prompt_format="none", root=root)
    peft = pytest.importorskip("peft")
    base = Registry(root, dtype=torch.float32, quant="none").get("tiny-llama")
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base.model), peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                                         target_modules=TARGETS))
    folder = store.adapter_dir("tiny-llama", "a", root)
    pm.save_pretrained(str(folder))
    (folder / "scratchchat.json").write_text(json.dumps({"base": "tiny-llama", "base_sha256": base.sha256}))
    return root


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_quantize_rows_is_on_a_bf16_exact_power_of_two_grid():
    torch.manual_seed(0)
    w = (torch.randn(96, 64) * torch.logspace(-3, 1, 96)[:, None]).bfloat16()
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and int(q.abs().max()) <= 127
    assert torch.equal(torch.exp2(torch.log2(scale.float()).round()), scale.float())  # powers of two
    assert int(q.abs().amax(1).min()) >= 64  # at most one bit of the range is given up
    deq = q.float() * scale.float()[:, None]
    assert torch.equal(deq.bfloat16().float(), deq)  # q * scale is exact in bf16
    assert bool(((deq - w.float()).abs() <= scale.float()[:, None] / 2 + 1e-12).all())
    q2, s2 = quantize_rows(deq.bfloat16())  # weights on the grid quantize to themselves
    assert torch.equal(q2, q) and torch.equal(s2, scale)


def test_int8_kernel_matches_a_float32_reference():
    torch.manual_seed(1)
    w = torch.randn(200, 96).bfloat16()
    q, scale = quantize_rows(w)
    bias = torch.randn(200).bfloat16()
    x = torch.randn(1, 1, 96).bfloat16()
    ref = x.float() @ (q.float() * scale.float()[:, None]).t() + bias.float()
    got = int8_linear(x, (q, scale), bias)
    assert got.shape == (1, 1, 200) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.02, rtol=0.01)


def test_quantized_model_logits_stay_close_to_bf16():
    model = _random_model(LLAMA, 3).bfloat16().eval()
    x = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(x)
        quantize_int8_(model)
        after = model(x)
    assert is_quantized(model)
    err = (after - before).norm() / before.norm()
    assert 0 < float(err) < 0.05, float(err)


def _decode_logits(model: GPT, rows: torch.Tensor, n_prefill: int) -> torch.Tensor:
    """Teacher-forced logits of ``rows`` (B, T) at positions >= n_prefill: prefill, then one token per step."""
    cache = KVCache.build(model.config, rows.shape[0], rows.shape[1], dtype=model.tok_emb.weight.dtype)
    out = [model(rows[:, :n_prefill], cache=cache)[:, -1:]]
    for t in range(n_prefill, rows.shape[1] - 1):
        out.append(model(rows[:, t : t + 1], cache=cache))
    return torch.cat(out, dim=1).float()  # (B, T - n_prefill, vocab)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_one_row_and_many_rows_compute_the_same_quantized_model(cfg, dtype):
    """Decode steps (one row, three rows) run the int8 kernel; prefill and the uncached forward run float GEMMs on
    the same grid weights. Their logits differ only by summation order (as the float GEMV and GEMM already do), far
    less than the quantization itself moves them. float32 needs our kernel (engine.kernels)."""
    if dtype == torch.float32 and not kernels.available():
        pytest.skip("int8 with float32 activations needs our AVX2 kernels (this CPU or build has none)")
    rows = torch.randint(0, 257, (3, 24), generator=torch.Generator().manual_seed(7))
    plain = _random_model(cfg, 2).to(dtype).eval().requires_grad_(False)
    quantized = copy.deepcopy(plain)
    quantize_int8_(quantized)
    with torch.inference_mode():
        float_paths = _rel(_decode_logits(plain, rows[:1], 6), plain(rows[:1])[:, 5:-1].float())
        full = quantized(rows).float()  # (3, 24, vocab): GEMMs over every position
        single = _decode_logits(quantized, rows[:1], 6)  # one row
        batched = _decode_logits(quantized, rows, 6)  # three rows
        quant_error = _rel(full, plain(rows).float())
        cfg_gen = GenerationConfig(max_new_tokens=12)
        prompt = rows[0, :6].tolist()
        assert list(generate_tokens(quantized, prompt, cfg_gen)) == list(generate_uncached(quantized, prompt, cfg_gen))
    int8_paths = _rel(single, full[:1, 5:-1])
    assert quant_error > 1e-3  # the weights did change
    assert int8_paths < quant_error / 4, (int8_paths, quant_error)
    assert int8_paths < 3 * float_paths + 1e-3, (int8_paths, float_paths)
    assert _rel(single, batched[:1]) < quant_error / 4
    assert _rel(batched, full[:, 5:-1]) < quant_error / 4


def test_scheduler_serves_an_int8_model(root):
    lm = Registry(root, dtype=torch.bfloat16, quant="int8").get("tiny-llama")
    assert lm.quant == "int8" and is_quantized(lm.model)
    cfg = GenerationConfig(max_new_tokens=16)
    prompts = _prompts(3)
    # prompts of 3-30 tokens, each prefilled in one pass from position 0 as generate_tokens does: a chunk over a
    # cached prefix takes engine.kernels' prefix attention (float32 math) where one pass takes SDPA (bf16), and on a
    # random tiny bf16 model their roundings can flip a near tie between the first tokens
    sched = Scheduler(max_batch=4, prefill_chunk=32)
    try:
        got = [[t for d in h for t in d.token_ids] for h in [sched.submit(Request(lm, None, p, cfg)) for p in prompts]]
    finally:
        sched.close()
    assert [len(g) for g in got] == [16, 16, 16]
    with torch.inference_mode():  # the first token comes from the prefill's GEMM, in both
        assert [g[0] for g in got] == [next(iter(generate_tokens(lm.model, p, cfg))) for p in prompts]


def test_adapter_rows_and_merge_unmerge_on_the_grid(root):
    reg = Registry(root, dtype=torch.bfloat16, quant="int8")
    lm = reg.get("tiny-llama")
    ad = reg.get_adapter(lm, "a")
    prompt = _prompts(1, seed=4)[0]
    cfg = GenerationConfig(max_new_tokens=12)
    originals = {k: v.clone() for k, v in lm.model.state_dict().items()}
    int8_before = {n: m.int8[0].clone() for n, m in lm.model.named_modules() if "int8" in m.__dict__}
    with torch.inference_mode():
        base = list(generate_tokens(lm.model, prompt, cfg))
        adapted = list(generate_tokens(lm.model, prompt, cfg, lora=BatchLora([ad])))
        assert adapted != base
        reg.merge("tiny-llama", "a")
        merged = list(generate_tokens(lm.model, prompt, cfg))
        assert merged == list(generate_uncached(lm.model, prompt, cfg))  # merged weights are back on the grid
        reg.unmerge("tiny-llama")
        assert list(generate_tokens(lm.model, prompt, cfg)) == base
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, originals[k]), k
    for n, m in lm.model.named_modules():
        if n in int8_before:
            assert torch.equal(m.int8[0], int8_before[n]), n


def test_int8_of_float32_needs_our_kernels_and_a_known_mode(root, monkeypatch):
    """float32 activations need our AVX2 kernel (PyTorch's int8 kernel takes bf16): without it, a clear error."""
    monkeypatch.setenv("SCRATCHCHAT_KERNELS", "off")
    kernels.available.cache_clear()
    try:
        with pytest.raises(ValueError, match="bf16"):
            Registry(root, dtype=torch.float32, quant="int8")
        with pytest.raises(ValueError, match="bf16"):
            quantize_int8_(_random_model(LLAMA, 0))
    finally:
        monkeypatch.delenv("SCRATCHCHAT_KERNELS")
        kernels.available.cache_clear()
    assert Registry(root, dtype=torch.float32, quant="int8").get("tiny-llama").quant == "int8"
    monkeypatch.setenv("SCRATCHCHAT_QUANT", "int4")
    with pytest.raises(ValueError, match="SCRATCHCHAT_QUANT"):
        default_quant()
    monkeypatch.setenv("SCRATCHCHAT_QUANT", "INT8")
    assert default_quant() == "int8"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_smollm2_int8_answers_paris(smollm2_store, dtype):
    if dtype == torch.float32 and not kernels.available():
        pytest.skip("int8 with float32 activations needs our AVX2 kernels (this CPU or build has none)")
    lm = Registry(smollm2_store, dtype=dtype, quant="int8").get("smollm2-135m-instruct")
    fmt, tok = lm.prompt_format, lm.tokenizer
    messages = [{"role": "system", "content": lm.manifest.get("system_prompt") or "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    ids = fmt.encode_chat(messages, tok)
    cfg = GenerationConfig(max_new_tokens=20)
    with torch.inference_mode():
        out = list(generate_tokens(lm.model, ids, cfg, stop_ids=tuple(tok.eos_token_ids)))
        # a real model's margins are wide: the int8 decode and the bf16 GEMM recompute agree token for token
        assert out == list(generate_uncached(lm.model, ids, cfg, stop_ids=tuple(tok.eos_token_ids)))
    assert "Paris" in tok.decode(out), tok.decode(out)
