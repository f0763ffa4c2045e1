"""KV cache: stepwise cached logits equal full-sequence logits, greedy cached tokens equal uncached ones exactly, for
both families, n_kv_heads in {1, 2, n_heads}, chunked prefill, batch 1 vs 2, ragged rows, overflow errors, and the
row/crop helpers the serving layer uses."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import ModelConfig
from engine.generate import decode_step, generate_tokens, generate_uncached, prefill
from engine.kv_cache import KVCache
from engine.model import GPT
from engine.sampling import GenerationConfig

# float32 through different kernels (a full pass's attention op vs the decode op, per step): on these logits
# (|logit| up to ~8.5) each path is within ~1.5e-5 of the same model in float64
TOL = dict(atol=3e-5, rtol=1e-5)
VARIANTS = [("gpt2", 4), ("gpt2", 2), ("llama", 1), ("llama", 2), ("llama", 4)]


def build(family: str, n_kv_heads: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = ModelConfig(vocab_size=257, context_length=48, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=n_kv_heads, ffn_dim=128)
    else:
        cfg = ModelConfig(vocab_size=257, context_length=48, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=n_kv_heads, ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope",
                          rope_base=100000.0, bias=False, qkv_bias=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if (p.dim() == 1 and name.endswith("weight")) else 0.0, 0.3)
    return model


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_stepwise_cached_logits_equal_full(family, n_kv):
    model = build(family, n_kv)
    x = ids(1, 20)
    with torch.no_grad():
        full = model(x)  # (1, 20, V)
        cache = KVCache.build(model.config, 1, 32)
        steps = torch.cat([model(x[:, t : t + 1], cache=cache) for t in range(20)], dim=1)
        exact = copy.deepcopy(model).double()(x)  # the oracle: the same weights with float64 products
    torch.testing.assert_close(steps, full, **TOL)
    for got in (steps, full):  # each path within float32 noise of it
        torch.testing.assert_close(got.double(), exact, atol=2e-5, rtol=1e-5)
    assert int(cache.lengths[0]) == 20


@pytest.mark.parametrize("family, n_kv", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
def test_chunked_prefill(family, n_kv, chunk):
    model = build(family, n_kv)
    x = ids(1, 20)
    with torch.no_grad():
        full = model(x)
    cache = KVCache.build(model.config, 1, 32)
    last = prefill(model, x[:, :16], cache, chunk_size=chunk)
    torch.testing.assert_close(last, full[:, 15], **TOL)
    for t in range(16, 20):  # decode the rest one token at a time
        torch.testing.assert_close(decode_step(model, x[:, t : t + 1], cache), full[:, t], **TOL)


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_greedy_cached_equals_uncached(family, n_kv):
    model = build(family, n_kv)
    prompt = ids(1, 6)[0].tolist()
    cfg = GenerationConfig(max_new_tokens=30)
    cached = list(generate_tokens(model, prompt, cfg))
    assert cached == list(generate_uncached(model, prompt, cfg))
    assert len(cached) == 30


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_batch_of_two_equals_single_rows(family, n_kv):
    model = build(family, n_kv)
    x = ids(2, 12)
    cache2 = KVCache.build(model.config, 2, 24)
    with torch.no_grad():
        batched = [model(x[:, :8], cache=cache2)]
        batched += [model(x[:, t : t + 1], cache=cache2) for t in range(8, 12)]
        batched = torch.cat(batched, dim=1)[:, -5:]  # logits for positions 7..11
        for row in range(2):
            cache1 = KVCache.build(model.config, 1, 24)
            single = [model(x[row : row + 1, :8], cache=cache1)]
            single += [model(x[row : row + 1, t : t + 1], cache=cache1) for t in range(8, 12)]
            torch.testing.assert_close(batched[row], torch.cat(single, dim=1)[0, -5:], **TOL)


@pytest.mark.parametrize("family, n_kv", VARIANTS)
def test_ragged_rows_equal_separate_runs(family, n_kv):
    """Row 0 holds 9 tokens and row 1 holds 4; batched decode steps give each row its own logits."""
    model = build(family, n_kv)
    a, b = ids(1, 12, seed=2), ids(1, 7, seed=3)
    cache = KVCache.build(model.config, 2, 24)
    with torch.no_grad():
        model(a[:, :9], cache=cache.rows(0, 1))
        model(b[:, :4], cache=cache.rows(1, 2))
        assert cache.lengths.tolist() == [9, 4]
        with pytest.raises(ValueError, match="different lengths"):
            _ = cache.pos
        steps = [model(torch.cat([a[:, t : t + 1], b[:, t - 5 : t - 4]]), cache=cache) for t in range(9, 12)]
        got = torch.cat(steps, dim=1)  # (2, 3, V)
        torch.testing.assert_close(got[0], model(a)[0, 9:12], **TOL)
        torch.testing.assert_close(got[1], model(b)[0, 4:7], **TOL)
    assert cache.lengths.tolist() == [12, 7]


def test_ragged_prefill_with_explicit_positions():
    """Left-aligned rows of different lengths prefilled in one pass via explicit per-row positions."""
    model = build("llama", 2)
    a, b = ids(1, 6, seed=4), ids(1, 6, seed=5)
    cache = KVCache.build(model.config, 2, 16)
    with torch.no_grad():
        model(a[:, :2], cache=cache.rows(0, 1))  # row 0 already holds 2 tokens, row 1 none
        positions = torch.tensor([[2, 3, 4, 5], [0, 1, 2, 3]])
        out = model(torch.cat([a[:, 2:6], b[:, :4]]), cache=cache, positions=positions)
        torch.testing.assert_close(out[0], model(a)[0, 2:6], **TOL)
        torch.testing.assert_close(out[1], model(b[:, :4])[0], **TOL)
    assert cache.lengths.tolist() == [6, 4]


@pytest.mark.parametrize("family, n_kv", VARIANTS)
@pytest.mark.parametrize("how", ["from scratch", "after a prefix", "ragged rows"])
def test_last_only_caches_every_position(family, n_kv, how):
    """``last_only`` runs the last block for the last position only: its logits are the full pass's last ones and
    the cache it leaves (every layer's keys and values for every position) is the same, bit for bit."""
    model = build(family, n_kv)
    x = ids(2, 12, seed=6)
    caches = [KVCache.build(model.config, 2, 24) for _ in range(2)]
    positions = None
    with torch.no_grad():
        if how != "from scratch":
            for c in caches:
                model(x[:, :5], cache=c)
        if how == "ragged rows":  # row 0 continues at 5, row 1 rewrites from 2: the per-row mask path
            positions = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 7, 8]])
        new = x[:, 5:] if how != "from scratch" else x[:, :7]
        full = model(new, cache=caches[0], positions=positions)
        last = model(new, cache=caches[1], positions=positions, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], **TOL)
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist()
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family, n_kv", [("gpt2", 4), ("llama", 2)])
def test_bf16_prefill_over_a_cached_prefix_matches_the_full_pass(family, n_kv):
    """A bf16 model's next chunk over its cache (engine.kernels' prefix attention, float32 math, where this CPU runs
    it) gives the full-sequence pass's logits (PyTorch's SDPA) within bf16 rounding."""
    model = build(family, n_kv).to(torch.bfloat16)
    x = ids(1, 20, seed=8)
    cache = KVCache.build(model.config, 1, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        full = model(x).float()
        model(x[:, :12], cache=cache)
        rest = model(x[:, 12:], cache=cache).float()
    torch.testing.assert_close(rest, full[:, 12:], atol=0.1, rtol=0.05)
    assert (rest.argmax(-1) == full[:, 12:].argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overflow_raises_with_lengths(family):
    model = build(family, 2)
    cache = KVCache.build(model.config, 1, 8)
    with torch.no_grad():
        model(ids(1, 6), cache=cache)
        with pytest.raises(ValueError, match=r"6 cached \+ 3 new tokens needs 9 positions, but the cache holds 8"):
            model(ids(1, 3), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context_length=48"):
        KVCache.build(model.config, 1, 49)


def test_cache_is_written_in_place():
    model = build("llama", 2)
    cache = KVCache.build(model.config, 1, 16)
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    list(generate_tokens(model, [1, 2, 3], GenerationConfig(max_new_tokens=10), cache=cache))
    assert [t.data_ptr() for t in cache.keys + cache.values] == pointers
    assert cache.keys[0].shape == (1, 2, 16, 8)  # (B, n_kv_heads, S, head_dim)


def test_crop_reset_and_row_copies():
    model = build("gpt2", 4)
    x = ids(1, 10)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.build(model.config, 1, 16)
        model(x, cache=cache)
        cache.crop(6)  # keep a shared prefix, recompute the rest
        torch.testing.assert_close(model(x[:, 6:], cache=cache), full[:, 6:], **TOL)
        cache.reset()
        assert cache.pos == 0
        torch.testing.assert_close(model(x[:, :4], cache=cache), full[:, :4], **TOL)
        saved = cache.extract_row(0)  # compact copy of the 4-token prefix
        assert saved.max_seq_len == 4 and saved.pos == 4
        big = KVCache.build(model.config, 3, 16)
        big.copy_row_(2, saved, 0)
        assert big.lengths.tolist() == [0, 0, 4]
        torch.testing.assert_close(model(x[:, 4:], cache=big.rows(2, 3)), full[:, 4:], **TOL)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(-1)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["op", "per-layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_positions_moves_exactly_the_given_positions(kernels_on, dtype, monkeypatch) -> None:
    """copy_positions_ (our one-op copy, or a copy per layer without the kernels) writes positions [0, n) of the
    source row into the destination row, for every layer's keys and values, and nothing else: the slice copy is
    the oracle; extract_row and copy_row_ go through it."""
    from engine import kernels

    if not kernels_on:
        monkeypatch.setattr(kernels, "available", lambda: False)
    cfg = build("llama", 2).config
    g = torch.Generator().manual_seed(0)
    src = KVCache.build(cfg, 2, 12, dtype=dtype)
    dst = KVCache.build(cfg, 3, 16, dtype=dtype)
    for t in src.keys + src.values + dst.keys + dst.values:
        t.copy_(torch.randn(t.shape, generator=g))
    expected = [t.clone() for t in dst.keys + dst.values]
    for e, t in zip(expected, src.keys + src.values, strict=True):
        e[2, :, :7] = t[1, :, :7]
    dst.copy_positions_(2, src, 1, 7)
    for got, want in zip(dst.keys + dst.values, expected, strict=True):
        assert torch.equal(got, want)
    src.lengths[1] = 7
    one = src.extract_row(1)
    assert one.max_seq_len == 7 and one.pos == 7
    for a, b in zip(one.keys + one.values, src.keys + src.values, strict=True):
        assert a.is_contiguous() and torch.equal(a[0], b[1, :, :7])
    dst.copy_row_(0, one, 0)  # back into another row, and within one cache
    dst.copy_row_(1, dst, 0)
    assert dst.lengths.tolist() == [7, 7, 0]
    for t, s in zip(dst.keys + dst.values, src.keys + src.values, strict=True):
        assert torch.equal(t[1, :, :7], s[1, :, :7])


def test_copy_positions_op_rejects_mismatched_caches() -> None:
    from engine import kernels

    if not kernels.available():
        pytest.skip("our kernels are not built on this machine")
    a, b = torch.zeros(2, 3, 8, 4), torch.zeros(2, 3, 8, 5)
    with pytest.raises(RuntimeError, match="caches alike"):
        torch.ops.scratchchat.copy_positions([a], 0, [b], 0, 4)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.scratchchat.copy_positions([a], 0, [torch.zeros(2, 3, 4, 4)], 0, 6)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.scratchchat.copy_positions([a], 2, [a.clone()], 0, 4)


def test_bytes_per_token():
    cfg = ModelConfig.from_name("smollm2-135m")
    assert KVCache.bytes_per_token(cfg, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    small = build("llama", 2).config
    cache = KVCache.build(small, 2, 10)
    assert cache.nbytes == 2 * 10 * KVCache.bytes_per_token(small)


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20  # pages resident x 4 KB


def test_a_big_cache_is_resident_only_where_written():
    """A big CPU cache is zero pages the kernel maps as they are first written. Building a 720 MB one (the
    scheduler's SmolLM2 pool) makes almost nothing resident (torch.zeros wrote all of it, on the first request),
    writing a few positions makes only their pages resident, and every unwritten value reads as zero."""
    cfg = ModelConfig(vocab_size=257, context_length=4096, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                      ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
    before = _resident_mb()
    cache = KVCache.build(cfg, 8, 4096, dtype=torch.bfloat16)
    assert cache.nbytes == 8 * 4096 * KVCache.bytes_per_token(cfg, torch.bfloat16) > 700 * 2**20
    assert _resident_mb() - before < 16
    for k, v in zip(cache.keys, cache.values, strict=True):
        k[1, :, :10] = 1.5
        v[2, :, 5:7] = -2.0
    assert _resident_mb() - before < 64  # 30 layers x (3 + 3) heads' first pages
    assert float(cache.keys[7][1, :, :10].float().mean()) == 1.5
    assert float(cache.values[29][2, :, 5:7].float().sum()) == -2.0 * 3 * 2 * 64
    assert not cache.keys[3][0].any() and not cache.keys[3][1, :, 10:].any() and not cache.values[0][7].any()
    small = KVCache.build(cfg, 1, 16, dtype=torch.bfloat16)  # under the threshold: an ordinary zeroed tensor
    assert not any(t.any() for t in small.keys + small.values)
