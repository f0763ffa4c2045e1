"""The inference fast paths of engine/model.py and engine/kv_cache.py against the plain (training) path.

With grad enabled the model runs every projection as its own ``nn.Linear`` (what training and peft see); with grad
off it runs q/k/v and gate/up as one fused matmul, single rows as a GEMV (``addmv``), and a decode step's positions
as slices of a cached arange. These tests pin that both give the same logits (tight float32 tolerances: the only
difference is the summation order inside a matmul), that the fused weights follow every change of the separate
weights (in-place edits as LoRA merge/unmerge and ``load_state_dict`` make, dtype changes), that they are stored
once and only for frozen weights, that the LoRA hook still sees each projection's own ``x`` and ``y``, and that
greedy tokens are unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.generate import decode_step, generate_tokens, generate_uncached, prefill
from engine.kv_cache import KVCache
from engine.linear import linear
from engine.model import GPT
from engine.sampling import GenerationConfig

TOL = dict(atol=2e-5, rtol=2e-5)
VARIANTS = [("gpt2", 4), ("llama", 1), ("llama", 2), ("llama", 4)]


def build(family: str, n_kv_heads: int, *, frozen: bool = False, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    common = dict(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads)
    if family == "gpt2":
        cfg = ModelConfig(**common, ffn_dim=128)
    else:
        cfg = ModelConfig(**common, ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_base=10000.0,
                          bias=False, qkv_bias=True)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if (p.dim() == 1 and name.endswith("weight")) else 0.0, 0.3)
    if frozen:  # as engine.registry serves a model
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: GPT, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """The plain path: grad on, so no fusion and no GEMV (the training path, which the oracle tests pin)."""
    with torch.enable_grad():
        return model(x, **kwargs).detach()


def test_linear_gemv_matches_f_linear():
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), **TOL)
        torch.testing.assert_close(linear(x, w), F.linear(x, w), **TOL)
        assert linear(x, w).shape == (1, 1, 48)
        x2 = torch.randn(2, 3, 32)  # more than one row: the GEMM
        torch.testing.assert_close(linear(x2, w, b), F.linear(x2, w, b), atol=0, rtol=0)
        wb, xb = w.bfloat16(), x.bfloat16()
        torch.testing.assert_close(linear(xb, wb).float(), F.linear(xb, wb).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_fused_equals_unfused_prefill_and_decode(family, n_kv, frozen):
    model = build(family, n_kv, frozen=frozen)
    x = ids(1, 14)
    full = reference_logits(model, x)  # (1, 14, V)
    with torch.no_grad():
        torch.testing.assert_close(model(x), full, **TOL)
        cache = KVCache.build(model.config, 1, 32)
        got = [model(x[:, :9], cache=cache)]  # prefill (GEMM on the fused weight)
        got += [model(x[:, t : t + 1], cache=cache) for t in range(9, 14)]  # decode (GEMV)
    torch.testing.assert_close(torch.cat(got, dim=1), full, **TOL)
    # only frozen projections are fused (trainable ones would need a second, soon stale copy)
    assert (model.blocks[0].attn._qkv is not None) == frozen


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_batched_uniform_and_ragged_decode(family, n_kv):
    model = build(family, n_kv, frozen=True)
    x = ids(2, 10)
    ref = reference_logits(model, x)
    with torch.no_grad():
        cache = KVCache.build(model.config, 2, 16)
        model(x[:, :6], cache=cache)
        steps = [model(x[:, t : t + 1], cache=cache) for t in range(6, 10)]  # uniform rows: no mask
        torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, 6:10], **TOL)
        assert cache.lengths.tolist() == [10, 10]
        cache.lengths[1] = 8  # ragged: row 1 re-decodes positions 8, 9
        a = model(torch.stack([x[0, 9:10], x[1, 8:9]]), cache=cache)
        torch.testing.assert_close(a[1, 0], ref[1, 8], **TOL)
        assert cache.lengths.tolist() == [11, 9]


def test_uniform_plan_builds_no_mask_for_decode():
    model = build("llama", 2)
    cache = KVCache.build(model.config, 1, 16)
    plan = cache.plan(5)
    assert plan.is_causal and plan.mask is None and plan.start == 0 and plan.advance_to == 5
    cache.commit(plan)
    plan = cache.plan(1)
    assert plan.mask is None and not plan.is_causal and plan.start == 5 and plan.span == 6
    assert plan.positions.tolist() == [[5]]
    plan = cache.plan(3)  # a later chunk sees the prefix and itself causally
    assert plan.mask.shape == (1, 1, 3, 8) and plan.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    with pytest.raises(ValueError, match="KV cache overflow: 5 cached \\+ 12 new tokens"):
        cache.plan(12)


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_frozen_weights_are_stored_once(family, n_kv):
    model = build(family, n_kv, frozen=True)
    names = sorted(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(ids(1, 4))
    attn = model.blocks[0].attn
    fused_w = attn._qkv.weight
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused_w.untyped_storage().data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == fused_w.untyped_storage().data_ptr()
    assert sorted(model.state_dict()) == names
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_weights_follow_in_place_changes(family, frozen):
    """LoRA merge/unmerge and optimizer steps change projection weights in place; the fused copy must follow."""
    model = build(family, 2, frozen=frozen)
    x = ids(1, 6)
    with torch.no_grad():
        before = model(x)
        mlp = model.blocks[1].mlp
        for lin in (model.blocks[0].attn.k_proj, mlp.gate_proj if family == "llama" else mlp.up_proj):
            lin.weight.add_(0.5)  # as merge_adapter's copy_ does
        after = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference_logits(model, x), **TOL)


def test_fused_weights_follow_load_state_dict_and_dtype_change():
    model = build("llama", 2, frozen=True)
    other = build("llama", 2, frozen=True, seed=7)
    x = ids(1, 6)
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x), atol=0, rtol=0)
        bf = model.to(torch.bfloat16)  # new parameter tensors: the fused weights are rebuilt in bf16
        out = bf(x)
    assert out.dtype == torch.float32  # a bf16 model returns float32 logits (its top-k refined in float32)
    assert bf.blocks[0].attn._qkv.weight.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_logits(other, x), atol=0.15, rtol=0.05)


def test_lora_hook_sees_each_projection():
    model = build("llama", 2, frozen=True)
    x = ids(1, 5)
    seen: list[tuple[int, str, tuple, tuple]] = []
    gen = torch.Generator().manual_seed(3)
    deltas: dict[tuple[int, str], torch.Tensor] = {}

    def hook(layer: int, proj: str, xin: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((layer, proj, tuple(xin.shape), tuple(y.shape)))
        key = (layer, proj)
        if key not in deltas:
            deltas[key] = torch.randn(xin.shape[-1], y.shape[-1], generator=gen) * 0.05
        return y + xin @ deltas[key]

    ref = reference_logits(model, x, lora=hook)
    n_ref = len(seen)
    seen.clear()
    with torch.no_grad():
        got = model(x, lora=hook)
        cache = KVCache.build(model.config, 1, 8)
        steps = [model(x[:, :3], cache=cache, lora=hook)] + [model(x[:, t : t + 1], cache=cache, lora=hook)
                                                              for t in (3, 4)]
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, **TOL)
    first = seen[:n_ref]
    d, kv, f = 32, 2 * 8, 64
    expected = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "gate_proj": (d, f),
                "up_proj": (d, f), "down_proj": (f, d)}
    assert sorted({p for _, p, _, _ in first}) == sorted(expected)
    for _layer, proj, xs, ys in first:
        assert (xs[-1], ys[-1]) == expected[proj]


class WrappedLinear(nn.Linear):
    """Stands in for a peft LoRA layer: not a plain nn.Linear, so the model must call it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.5


def test_wrapped_projections_are_called_not_fused():
    model = build("llama", 2, frozen=True)
    attn = model.blocks[0].attn
    wrapped = WrappedLinear(32, 32, bias=True)
    wrapped.load_state_dict(attn.q_proj.state_dict())
    attn.q_proj = wrapped
    x = ids(1, 6)
    with torch.no_grad():
        got = model(x)
        cache = KVCache.build(model.config, 1, 8)
        steps = [model(x[:, :5], cache=cache), model(x[:, 5:6], cache=cache)]
    ref = reference_logits(model, x)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, **TOL)
    assert attn._qkv is None


def test_training_path_is_unfused_and_trains():
    model = build("llama", 2).train()
    x = ids(2, 8)
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 257), x[:, 1:].reshape(-1))
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad is not None
    assert model.blocks[0].mlp.gate_proj.weight.grad is not None
    assert model.blocks[0].attn._qkv is None and model.blocks[0].mlp._gate_up is None
    # an optimizer step changes the weights in place; evaluation afterwards sees the new weights
    model.eval()
    with torch.no_grad():
        model(x)
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        torch.testing.assert_close(model(x), reference_logits(model, x), **TOL)


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_greedy_tokens_unchanged(family, n_kv):
    """Fast-path generation (inference mode) equals the plain path token for token."""
    model = build(family, n_kv, frozen=True)
    prompt = ids(1, 5)[0].tolist()
    cfg = GenerationConfig(max_new_tokens=20)
    fast = list(generate_tokens(model, prompt, cfg))
    assert fast == list(generate_uncached(model, prompt, cfg))
    seq = torch.tensor([prompt + fast[:-1]])
    ref = reference_logits(model, seq)  # plain path over the whole sequence
    assert ref[0, len(prompt) - 1 :].argmax(-1).tolist() == fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_decode_step_dtypes(dtype):
    model = build("llama", 2, frozen=True).to(dtype)
    x = ids(1, 9)
    cache = KVCache.build(model.config, 1, 16, dtype=dtype)
    last = prefill(model, x[:, :8], cache, chunk_size=3)
    step = decode_step(model, x[:, 8:9], cache)
    assert last.dtype == torch.float32 and step.shape == (1, 257)  # logits are float32 in both dtypes
    ref = reference_logits(model, x)
    tol = TOL if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(last.float(), ref[:, 7].float(), **tol)
    torch.testing.assert_close(step.float(), ref[:, 8].float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rope_equals_rotate_half(dtype):
    from engine.model import _apply_rope_rolled, _rope_tables, apply_rope, build_rope_cache

    cfg = ModelConfig(vocab_size=257, context_length=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False)
    cos, sin = build_rope_cache(cfg)
    x = torch.randn(2, 6, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    c, s = cos[3:8][None, None].to(dtype), sin[3:8][None, None].to(dtype)
    # bit for bit, in bf16 too (bf16 greedy answers flip on a single rounding difference)
    torch.testing.assert_close(_apply_rope_rolled(x, *_rope_tables(c, s)), apply_rope(x, c, s), atol=0, rtol=0)


def test_row_views_are_reused_and_share_storage():
    model = build("gpt2", 4)
    cache = KVCache.build(model.config, 3, 16)
    assert cache.rows(0, 3) is cache
    two = cache.rows(0, 2)
    assert cache.rows(0, 2) is two  # a decode step of the scheduler asks for the same rows every time
    with torch.no_grad():
        model(ids(2, 5), cache=two)
    assert cache.lengths.tolist() == [5, 5, 0]
    assert torch.equal(cache.keys[0][:2, :, :5], two.keys[0][:, :, :5])


def test_lora_merge_and_unmerge_on_a_fused_model(tmp_path):
    """merge_adapter writes into q/k/v/gate/up in place: the fused weights (views) must see it, and unmerge too."""
    peft = pytest.importorskip("peft")
    import copy

    from engine.lora import BatchLora, load_adapter, merge_adapter

    model = build("llama", 2, frozen=True)
    x = ids(2, 7)
    with torch.no_grad():
        base_out = model(x)  # builds the fused weights
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    adapter = load_adapter(tmp_path / "ad", model.config)
    with torch.no_grad():
        out = pm(x)
        expected = getattr(out, "logits", out)
        hooked = model(x, lora=BatchLora([adapter, adapter]))
        handle = merge_adapter(model, adapter)
        merged = model(x)
        cache = KVCache.build(model.config, 2, 8)
        steps = [model(x[:, :6], cache=cache), model(x[:, 6:7], cache=cache)]
        handle.unmerge()
        after = model(x)
    torch.testing.assert_close(hooked, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, base_out, atol=0, rtol=0)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn._qkv.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_bf16_head_recomputes_the_top_logits_in_float32(path, monkeypatch):
    """A bf16 head rounds logits to coarse steps; the top-k are recomputed in float32 from the same bf16 inputs (our
    one-op kernel, or PyTorch's ops where the kernels are unavailable); every other logit is the head's, widened."""
    import engine.linear as lin

    if path == "kernel" and not lin.kernels.available():
        pytest.skip("our kernels are unavailable here")
    if path == "pytorch":
        monkeypatch.setattr(lin.kernels, "available", lambda: False)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 40).bfloat16()
    weight = torch.randn(2000, 40).bfloat16() * 8
    weight[7] = weight[3]  # two equal rows: equal head logits, both in the top
    head = torch.nn.functional.linear(x, weight)
    logits = lin.refine_top_logits(head, x, weight, k=5)
    exact = torch.nn.functional.linear(x.float(), weight.float())
    top = exact.topk(5, dim=-1).indices
    assert logits.dtype == torch.float32 and logits.shape == head.shape
    torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, head.float().topk(5, dim=-1).indices, False)
    assert torch.equal(logits[rest], head.float()[rest])  # outside the recomputed top-k: the head's own logits
