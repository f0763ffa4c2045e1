"""The model against transformers as the oracle (same random weights, eager attention, fp32), plus the components
alone: RMSNorm vs LlamaRMSNorm, RoPE vs HF's rotary embedding and Burkov's worked vector, GELU values (seed b4),
LayerNorm's biased variance (seed b3)."""

from __future__ import annotations

import math

import pytest
import torch

from engine import kernels
from engine.config import ModelConfig
from engine.generate import generate_tokens
from engine.kv_cache import KVCache
from engine.model import GPT, LayerNorm, RMSNorm, apply_rope, build_model, build_rope_cache, gelu_tanh
from engine.sampling import GenerationConfig

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=0)


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Give every parameter non-trivial random values (HF's init leaves norms at 1 and biases at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = p.dim() == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if is_norm_scale else 0.0))


# ---------------------------------------------------------------- GPT-2

def hf_gpt2(cfg: ModelConfig):
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ffn_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
    )
    hf_cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def gpt2_state_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 -> our names: Conv1D weights are (in, out), so transpose; split the fused c_attn into q/k/v."""
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{b}{ours}.weight"], out[f"{b}{ours}.bias"] = sd[f"{h}{theirs}.weight"], sd[f"{h}{theirs}.bias"]
        q, k, v = sd[f"{h}attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = sd[f"{h}attn.c_attn.bias"].chunk(3)
        for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{b}attn.{name}.weight"], out[f"{b}attn.{name}.bias"] = w, bias
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            out[f"{b}{ours}.weight"] = sd[f"{h}{theirs}.weight"].t()
            out[f"{b}{ours}.bias"] = sd[f"{h}{theirs}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def tiny_gpt2_config() -> ModelConfig:
    return ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                       ffn_dim=128)


def test_gpt2_matches_transformers():
    cfg = tiny_gpt2_config()
    hf = hf_gpt2(cfg)
    randomize(hf)
    ours = GPT(cfg).eval()
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict(), cfg), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == (2, 20, cfg.vocab_size)
    torch.testing.assert_close(got, expected, **TOL)
    assert float(expected.std()) > 0.5  # the weights really are random, not a near-constant output


def test_gpt2_greedy_continuation_matches_transformers():
    cfg = tiny_gpt2_config()
    hf = hf_gpt2(cfg)
    randomize(hf, seed=3)
    ours = GPT(cfg).eval()
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict(), cfg), strict=True)
    prompt = [10, 20, 30, 40]
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert list(generate_tokens(ours, prompt, GenerationConfig(max_new_tokens=30))) == hf_ids


@pytest.mark.slow
def test_gpt2_124m_config_matches_transformers():
    cfg = ModelConfig.from_name("gpt2-small")
    hf = hf_gpt2(cfg)
    randomize(hf, std=0.05)
    ours = build_model(cfg, device="meta").eval()  # no init work: the weights are assigned below
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict(), cfg), strict=True, assign=True)
    idx = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, **TOL)


# ---------------------------------------------------------------- Llama

def llama_config(n_kv_heads: int = 2, tie: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                       ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_base=100000.0, norm_eps=1e-5,
                       bias=False, qkv_bias=False, tie_embeddings=tie)


def hf_llama(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context_length, rope_theta=cfg.rope_base, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf_cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf_cfg).eval()


def llama_state_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[f"{b}attn_norm.weight"] = sd[f"{h}input_layernorm.weight"]
        out[f"{b}mlp_norm.weight"] = sd[f"{h}post_attention_layernorm.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{b}attn.{p}.weight"] = sd[f"{h}self_attn.{p}.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[f"{b}mlp.{p}.weight"] = sd[f"{h}mlp.{p}.weight"]
    return out


@pytest.mark.parametrize("n_kv_heads, tie", [(2, True), (1, True), (4, False)])
def test_llama_matches_transformers(n_kv_heads, tie):
    cfg = llama_config(n_kv_heads, tie)
    hf = hf_llama(cfg)
    randomize(hf)
    ours = GPT(cfg).eval()
    ours.load_state_dict(llama_state_from_hf(hf.state_dict(), cfg), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, **TOL)
    assert float(expected.std()) > 0.5


def test_llama_greedy_continuation_matches_transformers():
    cfg = llama_config(2, True)
    hf = hf_llama(cfg)
    randomize(hf, seed=5)
    ours = GPT(cfg).eval()
    ours.load_state_dict(llama_state_from_hf(hf.state_dict(), cfg), strict=True)
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert list(generate_tokens(ours, prompt, GenerationConfig(max_new_tokens=30))) == hf_ids


# ---------------------------------------------------------------- components

def test_rmsnorm_matches_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 32) * 4
    theirs, ours = LlamaRMSNorm(32, eps=1e-5), RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(32))
        ours.weight.copy_(theirs.weight)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
        # a bf16 module: computed in float32 and cast back, so it agrees with HF to bf16 precision
        xb = x.bfloat16()
        got, expected = ours.bfloat16()(xb), theirs.bfloat16()(xb)
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.02)
        ours.float(), theirs.float()
    manual = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * ours.weight  # no mean subtraction, no bias
    torch.testing.assert_close(ours(x), manual.detach(), atol=1e-6, rtol=0)


def test_rope_matches_transformers_rotary():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = llama_config(2)
    hf_cfg = hf_llama(cfg).config
    rotary = LlamaRotaryEmbedding(hf_cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    positions = torch.arange(20, 30)[None]
    cos_hf, sin_hf = rotary(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = build_rope_cache(cfg)
    cos, sin = cos[positions][:, None], sin[positions][:, None]
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf, atol=1e-6, rtol=0)


def test_rope_burkov_worked_vector():
    """Burkov's q = [0.8, 0.6, 0.7, 0.3, 0.5, 0.4] at t = 100 (theta 10000, d = 6) -> [0.99, 0.11, 0.25, -0.72,
    0.40, 0.50]. The book rotates interleaved pairs (q1, q2), (q3, q4), (q5, q6); our rotate-half layout pairs
    (x_i, x_{i+d/2}), so the vector is permuted into that layout ([q1, q3, q5, q2, q4, q6]) and back."""
    cfg = ModelConfig(vocab_size=8, context_length=128, d_model=6, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8,
                      norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_base=10000.0, bias=False)
    q = torch.tensor([0.8, 0.6, 0.7, 0.3, 0.5, 0.4])
    to_half = torch.tensor([0, 2, 4, 1, 3, 5])
    cos, sin = build_rope_cache(cfg)
    rotated_half = apply_rope(q[to_half], cos[100], sin[100])
    rotated = torch.empty(6)
    rotated[to_half] = rotated_half
    assert [round(float(v), 2) for v in rotated] == [0.99, 0.11, 0.25, -0.72, 0.40, 0.50]
    # the frequencies theta_p = 10000^(-2(p-1)/d): 1.0, 0.0464, 0.0022
    angle = torch.atan2(sin[1], cos[1])[:3]
    assert [round(float(a), 4) for a in angle] == [1.0, 0.0464, 0.0022]
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), abs=1e-6)  # a rotation keeps the length


@pytest.mark.parametrize("x, expected", [(1.0, 0.841192), (-1.0, -0.158808), (2.0, 1.954598), (0.5, 0.345714)])
def test_gelu_tanh_values(x, expected):
    y = float(gelu_tanh(torch.tensor(x, dtype=torch.float64)))
    assert y == pytest.approx(expected, abs=5e-7)
    formula = 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert y == pytest.approx(formula, abs=1e-12)


def test_gelu_minimum_near_minus_0_75():
    xs = torch.linspace(-2, 0, 200001, dtype=torch.float64)
    ys = gelu_tanh(xs)
    assert float(xs[ys.argmin()]) == pytest.approx(-0.7525, abs=1e-3)
    assert float(ys.min()) == pytest.approx(-0.1700, abs=1e-4)


def test_layernorm_biased_variance():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    ln = LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(6))
        ln.bias.copy_(torch.randn(6))
        y = ln(x)
    mean = x.mean(-1, keepdim=True)
    biased = ((x - mean) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)) * ln.weight + ln.bias
    unbiased = ((x - mean) / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + 1e-5)) * ln.weight + ln.bias
    torch.testing.assert_close(y, biased.detach(), atol=1e-6, rtol=0)
    assert not torch.allclose(y, unbiased.detach(), atol=1e-3)
    # scale initialised to 1 and shift to 0: mean 0, biased variance 1 per row
    fresh = LayerNorm(6)(x).detach()
    torch.testing.assert_close(fresh.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh.var(-1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


@pytest.mark.skipif(not kernels.available(), reason="engine.kernels needs an AVX2/FMA CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_runs_the_decode_steps_op_in_inference_and_autograd_in_training(dtype):
    """Inference runs scratchchat::layer_norm (what a decode step's blocks run: the same bits); with grad on,
    F.layer_norm with its gradients. The two agree within the weights' dtype."""
    torch.manual_seed(1)
    ln = LayerNorm(40).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(40))
        ln.bias.copy_(0.1 * torch.randn(40))
    x = 3 * torch.randn(2, 3, 40) + 2  # the float32 residual stream
    with torch.no_grad():
        y = ln(x)
    assert y.dtype == dtype and torch.equal(y, torch.ops.scratchchat.layer_norm(x, ln.weight, ln.bias, ln.eps))
    xg = x.clone().requires_grad_(True)
    yg = ln(xg)
    yg.float().sum().backward()
    assert xg.grad is not None and ln.weight.grad is not None and ln.bias.grad is not None
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), yg.detach().float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not kernels.available(), reason="engine.kernels needs an AVX2/FMA CPU")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_inference_attention_runs_our_kernel_and_equals_the_sdpa_path(family, monkeypatch):
    """At inference every attention call (a prompt without a cache, a first prefill into a fresh cache, the last
    position only, a chunk over a cached prefix) runs engine.kernels' prefix_attention, and the logits equal the
    training path's (grad on: PyTorch's SDPA) to float32 noise."""
    cfg = tiny_gpt2_config() if family == "gpt2" else llama_config(2)
    model = GPT(cfg).eval()
    randomize(model)
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(3))
    sdpa = model(idx).detach()  # grad on: the SDPA path
    calls = []
    op = torch.ops.scratchchat.prefix_attention
    monkeypatch.setattr(torch.ops.scratchchat, "prefix_attention", lambda *a: calls.append(a[3]) or op(*a))
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), sdpa, **tol)
        assert len(calls) == cfg.n_layers and torch.equal(calls[0], torch.arange(20).expand(2, 20))
        torch.testing.assert_close(model(idx, last_only=True), sdpa[:, -1:], **tol)
        assert torch.equal(calls[-1], torch.tensor([[19], [19]]))  # the last block: the last query over all keys
        cache = KVCache.build(cfg, 2, 32)
        torch.testing.assert_close(model(idx[:, :12], cache=cache), sdpa[:, :12], **tol)
        torch.testing.assert_close(model(idx[:, 12:], cache=cache), sdpa[:, 12:], **tol)
        assert torch.equal(calls[-1], torch.arange(12, 20).expand(2, 8))
    assert len(calls) == 4 * cfg.n_layers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_float64_model_runs_at_inference(family):
    """Our kernels take float32 and bf16 weights: a float64 model (for checking numerics) runs PyTorch's ops at
    inference instead of failing in them, and gives what it gives with grad on."""
    cfg = tiny_gpt2_config() if family == "gpt2" else llama_config(2)
    model = GPT(cfg).double().eval()
    randomize(model)
    idx = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(idx)
    torch.testing.assert_close(got, model(idx).detach(), atol=1e-12, rtol=1e-12)


def test_last_only_and_positions():
    cfg = llama_config(2)
    model = GPT(cfg).eval()
    randomize(model)
    idx = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        full = model(idx)
        # float32 noise only: the last block's matmuls run 1 row instead of 12 (another blocking)
        torch.testing.assert_close(model(idx, last_only=True), full[:, -1:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(idx, positions=torch.arange(12)), full, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds context_length=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("cast", ["bfloat16", "half", "meta"])
def test_rope_tables_stay_float32_through_casts(cast):
    """Casting the weights leaves the RoPE tables float32 and exact (rebuilt, not rounded and widened back), on the
    model's new device."""
    cfg = ModelConfig(vocab_size=50, context_length=40, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
    model = GPT(cfg)
    model = model.to("meta").bfloat16() if cast == "meta" else getattr(model, cast)()
    assert model.tok_emb.weight.dtype != torch.float32
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert model.rope_cos.device == model.tok_emb.weight.device
    if cast != "meta":
        want_cos, want_sin = build_rope_cache(cfg)
        assert torch.equal(model.rope_cos, want_cos) and torch.equal(model.rope_sin, want_sin)
