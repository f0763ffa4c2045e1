"""engine.prepack: packed decode weights give the plain model's logits and tokens, go stale safely when a weight
changes in place, follow a registry merge/unmerge, and never touch the global RNG."""

from __future__ import annotations

import pytest
import torch

from engine import decode, kernels, prepack
from engine.config import ModelConfig
from engine.generate import generate_tokens, generate_uncached
from engine.kv_cache import KVCache
from engine.model import GPT
from engine.sampling import GenerationConfig


def frozen_tiny(family: str, tied: bool = True) -> GPT:
    torch.manual_seed(7)
    if family == "gpt2":
        cfg = ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                          ffn_dim=256, tie_embeddings=tied)
    else:
        cfg = ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          ffn_dim=128, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False,
                          tie_embeddings=tied)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
            p.requires_grad_(False)
    return model


def available_kernels() -> list[str]:
    w = torch.randn(8, 16)
    out = []
    for name, pack in prepack.PACKERS.items():
        try:
            pw = prepack.PackedWeight(name, pack(w), w, ())
            prepack.packed_linear(torch.randn(1, 16), pw)
        except (RuntimeError, AttributeError, NotImplementedError):
            continue
        out.append(name)
    return out


KERNELS = available_kernels()


def decode_logits(model: GPT, prompt: list[int], steps: int) -> torch.Tensor:
    cache = KVCache.build(model.config, 1, 32, dtype=model.tok_emb.weight.dtype)
    out = []
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache)
        for t in range(steps):
            out.append(model(torch.tensor([[t + 3]]), cache=cache))
    return torch.cat(out, dim=1)


def test_prefill_rows_per_kernel(monkeypatch):
    """Copies of our panels serve prefill chunks (PANEL_ROWS); dot-product panels too (DP_ROWS) except on AMX CPUs,
    where oneDNN multiplies bf16 on the tiles; the library kernels' copies serve decode batches only."""
    for amx, dp_rows in ((False, prepack.DP_ROWS), (True, prepack.BATCH_ROWS)):
        monkeypatch.setattr(kernels, "has_amx", lambda amx=amx: amx)
        assert prepack._prefill_rows("dpbf16") == dp_rows
        assert prepack._prefill_rows("panel") == prepack.PANEL_ROWS
        assert prepack._prefill_rows("onednn") == prepack._prefill_rows("mkl") == prepack.BATCH_ROWS


@pytest.mark.skipif(not (kernels.available() and kernels.has_avx512_bf16()) or kernels.has_amx(),
                    reason="bf16 dot-product panels serve prefill on AVX512-BF16 CPUs without AMX")
def test_dot_product_panels_serve_prefill_chunks_up_to_dp_rows():
    """A chat turn's new tokens (up to DP_ROWS) go through the dot-product panels, bit for bit what the kernel gives
    for those rows; longer chunks through PyTorch's GEMM on the weight; the model's tokens stay the plain model's."""
    model = frozen_tiny("llama").to(torch.bfloat16)
    cfg = GenerationConfig(max_new_tokens=12)
    plain_tokens = list(generate_tokens(model, [5, 17, 42], cfg))
    assert prepack.prepack_(model, "dpbf16")["qkv"] == f"dpbf16[1-{prepack.DP_ROWS} rows]"
    fused = model.blocks[0].attn._qkv
    weight, bias = fused.get()
    n = weight.shape[0]
    with torch.inference_mode():
        for rows in (9, 40, prepack.DP_ROWS):
            x = torch.randn(rows, 64).bfloat16()
            assert torch.equal(fused.apply(x), kernels.linear_dpbf16(x, fused.packed.packed, n))
        x = torch.randn(prepack.DP_ROWS + 1, 64).bfloat16()
        assert torch.equal(fused.apply(x), torch.nn.functional.linear(x, weight, bias))
    assert list(generate_tokens(model, [5, 17, 42], cfg)) == list(generate_uncached(model, [5, 17, 42], cfg))
    assert list(generate_tokens(model, [5, 17, 42], cfg)) == plain_tokens


def test_this_build_has_a_packed_kernel():
    assert KERNELS, "neither MKL nor oneDNN packed linear works in this torch build"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family,tied", [("gpt2", True), ("llama", True), ("llama", False)])
def test_packed_decode_equals_plain(kernel, family, tied):
    model = frozen_tiny(family, tied)
    plain = decode_logits(model, [5, 17, 42], 6)
    chosen = prepack.prepack_(model, kernel)
    kinds = {"qkv", "o_proj", "down_proj", "head"} | ({"gate_up"} if family == "llama" else {"up_proj"})
    rows = prepack.PANEL_ROWS if kernel == "panel" else prepack.BATCH_ROWS  # panels serve prefill chunks too
    label = kernel if kernel not in prepack.MULTI_ROW else f"{kernel}[1-{rows} rows]"
    assert chosen == dict.fromkeys(kinds, label)
    assert model.blocks[0].attn._qkv.packed.kernel == kernel
    assert ("head_packed" in model.__dict__) == tied
    torch.testing.assert_close(decode_logits(model, [5, 17, 42], 6), plain, rtol=1e-5, atol=1e-5)
    cfg = GenerationConfig(max_new_tokens=20)
    assert list(generate_tokens(model, [5, 17, 42], cfg)) == list(generate_uncached(model, [5, 17, 42], cfg))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_weight_changed_in_place_makes_its_packed_copy_stale(kernel):
    model = frozen_tiny("llama")
    prepack.prepack_(model, kernel)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    with torch.no_grad():
        attn.k_proj.weight.mul_(1.5)  # part of the fused q/k/v
        mlp.down_proj.weight.add_(0.1)
        model.tok_emb.weight[7].add_(1.0)  # the tied head
    assert not attn._qkv.packed.fresh(attn._qkv.sources())
    assert not mlp.down_proj.packed.fresh([mlp.down_proj.weight])
    assert model.blocks[0].attn._qkv.packed.fresh(model.blocks[0].attn._qkv.sources())
    packed = decode_logits(model, [5, 17, 42], 4)
    prepack.prepack_(model, "off")
    assert model.blocks[0].attn._qkv.packed is None and model.decode_kernels["qkv"] == "plain"
    torch.testing.assert_close(packed, decode_logits(model, [5, 17, 42], 4), rtol=1e-5, atol=1e-5)


def test_auto_measures_and_keeps_the_global_rng():
    model = frozen_tiny("gpt2")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    chosen = prepack.prepack_(model, "auto")
    assert torch.equal(torch.rand(4), expected)
    assert all(v == "plain" or all(p.split("[")[0] in KERNELS for p in v.split("+")) for v in chosen.values())
    qkv_packed = [b.attn._qkv.packed for b in model.blocks]
    assert all((p is None) == (chosen["qkv"] == "plain") for p in qkv_packed)

    def copies(label: str) -> bool:  # our kernels ("scratch") read the weight itself
        return label != "plain" and any(part.split("[")[0] != "scratch" for part in label.split("+"))

    extra = sum(t.weight.numel() * 4 for t in prepack.decode_weights(model) if copies(chosen[t.kind]))
    assert model.packed_bytes == extra


def test_bad_modes_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="pack mode"):
        prepack.prepack_(frozen_tiny("gpt2"), "fast")
    monkeypatch.setenv("SCRATCHCHAT_PACK", "sometimes")
    with pytest.raises(ValueError, match="SCRATCHCHAT_PACK"):
        prepack.default_pack()


@pytest.mark.parametrize("kernel", KERNELS)
def test_registry_repacks_after_merge_and_unmerge(tmp_path, kernel):
    """A merge writes the base weights in place; the registry packs them again, and outputs follow the weights."""
    peft = pytest.importorskip("peft")
    import copy

    from engine.registry import Registry
    from weights import store

    model = frozen_tiny("llama")
    root = tmp_path / "models"
    store.add_model("tiny", model.config.to_dict(), model.state_dict(), tokenizer={"type": "none"},
                    prompt_format="none", root=root)
    reg = Registry(root, dtype=torch.float32, pack=kernel)
    lm = reg.get("tiny")
    assert lm.model.decode_kernels["gate_up"].split("[")[0] == kernel
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.save_pretrained(str(store.adapter_dir("tiny", "ad", root)))
    base = decode_logits(lm.model, [5, 17, 42], 4)
    reg.merge("tiny", "ad")
    qkv = lm.model.blocks[0].attn._qkv
    assert qkv.packed is not None and qkv.packed.fresh(qkv.sources())
    merged = decode_logits(lm.model, [5, 17, 42], 4)
    with torch.no_grad():
        out = pm(torch.tensor([[5, 17, 42, 3, 4, 5, 6]]))
    torch.testing.assert_close(merged[0], getattr(out, "logits", out)[0, 3:], rtol=1e-4, atol=1e-4)
    reg.unmerge("tiny")
    assert qkv.packed.fresh(qkv.sources())
    torch.testing.assert_close(decode_logits(lm.model, [5, 17, 42], 4), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(set(KERNELS) & set(prepack.MULTI_ROW)))
def test_batched_decode_rows_use_the_packed_copy_and_equal_plain(kernel, monkeypatch):
    """A decode step of 3 rows (different lengths, as the scheduler batches them) through the packed copies."""
    model = frozen_tiny("llama")

    def batched() -> torch.Tensor:
        cache = KVCache.build(model.config, 3, 32)
        with torch.inference_mode():
            for row, prompt in enumerate(([5, 17, 42], [9, 8], [1, 2, 3, 4])):
                model(torch.tensor([prompt]), cache=cache.rows(row, row + 1))
            return torch.cat([model(torch.tensor([[7], [8], [9]]), cache=cache) for _ in range(3)], dim=1)

    plain = batched()
    prepack.prepack_(model, kernel)
    calls = []
    real = prepack.packed_linear
    def counting(x, pw, b=None):
        calls.append(x.shape)
        return real(x, pw, b)

    monkeypatch.setattr("engine.linear.packed_linear", counting)  # the module path
    monkeypatch.setattr("engine.prepack.packed_linear", counting)  # the decode runner (engine.decode)
    torch.testing.assert_close(batched(), plain, rtol=1e-5, atol=1e-5)
    runner = model._decode_runners[3]
    if runner.meta is None:  # the Python layer loop: the 3-row steps went through the packed kernel
        assert any(shape[0] == 3 for shape in calls)
    else:  # the one-op step (decode_step): every product and the head on the packed copy's kernel
        kind = {"scratch": 0, "panel": 1, "dpbf16": 3}[kernel]
        assert {runner.meta[i + j] for i in range(0, len(runner.meta), decode.META) for j in (3, 5, 7, 9)} == {kind}
        assert runner.head[2][1] == kind


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_deep_copy_drops_packed_copies_and_decodes_the_same(kernel):
    import copy

    model = frozen_tiny("llama")
    prepack.prepack_(model, kernel)
    twin = copy.deepcopy(model)
    assert twin.blocks[0].attn._qkv.packed is None and twin.__dict__.get("head_packed") is None
    torch.testing.assert_close(decode_logits(twin, [5, 17, 42], 4), decode_logits(model, [5, 17, 42], 4),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("panel" not in KERNELS, reason="our kernels are unavailable here")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int8_models_decode_through_int8_panels_like_the_row_form_kernel(family):
    """A quantized model gets int8 panel copies (with engine.quant's scales) for 1-8 rows; they compute the same
    products as the row-form int8 kernel (only the summation order differs), and go stale with their weights."""
    import copy

    from engine.quant import quantize_int8_

    model = frozen_tiny(family)
    quantize_int8_(model)
    rows_form = copy.deepcopy(model)  # a deep copy drops packed copies: the row-form int8 kernel
    rows_form.head_int8 = model.head_int8
    chosen = prepack.prepack_(model, "auto")
    # one row: the panels or the row-form kernel, whichever ran faster at load; 2+ rows: the panels
    assert set(chosen.values()) <= {"int8 panel", f"int8 rows[1 row]+panel[2-{prepack.PANEL_ROWS} rows]"}, chosen
    pw = model.blocks[0].mlp.down_proj.packed
    assert pw.kernel == "panel" and pw.packed.dtype == torch.int8 and pw.scale is not None and pw.serves(8)
    assert model.packed_bytes == sum(t.int8[0].numel() for t in prepack.decode_weights(model))
    torch.testing.assert_close(decode_logits(model, [5, 17, 42], 4), decode_logits(rows_form, [5, 17, 42], 4),
                               rtol=1e-4, atol=1e-4)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
    assert list(generate_tokens(model, [3, 9, 27], cfg)) == list(generate_uncached(model, [3, 9, 27], cfg))
    with torch.no_grad():
        model.blocks[0].mlp.down_proj.weight.mul_(1.0)  # an in-place write: the panel copy is stale now
    assert not pw.fresh([model.blocks[0].mlp.down_proj.weight])
    torch.testing.assert_close(decode_logits(model, [5, 17, 42], 4), decode_logits(rows_form, [5, 17, 42], 4),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_a_copy_budget_keeps_copies_within_it(quant):
    """max_copy_bytes (the registry passes what its memory cap leaves beside the weights): kinds whose copies would
    pass it get copy-free kernels, and the model still decodes what the plain one does."""
    from engine.quant import quantize_int8_

    model = frozen_tiny("llama")
    if quant == "int8":
        quantize_int8_(model)
    plain = decode_logits(model, [5, 17, 42], 4)
    chosen = prepack.prepack_(model, "auto", max_copy_bytes=0)
    assert model.packed_bytes == 0
    for label in chosen.values():
        assert label in ("plain", "int8") or all(p.split("[")[0] == "scratch" for p in label.split("+")), label
    torch.testing.assert_close(decode_logits(model, [5, 17, 42], 4), plain, rtol=1e-4, atol=1e-4)
    head = next(t for t in prepack.decode_weights(model) if t.kind == "head")
    room = head.int8[0].numel() if quant == "int8" else head.weight.numel() * head.weight.element_size()
    prepack.prepack_(model, "auto", max_copy_bytes=room)
    assert model.packed_bytes <= room


def test_the_registry_packs_within_its_memory_cap(tmp_path):
    from engine.registry import Registry
    from weights import store

    model = frozen_tiny("llama")
    store.add_model("tiny", model.config.to_dict(), model.state_dict(), tokenizer={"type": "none"},
                    prompt_format="none", root=tmp_path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lm = Registry(tmp_path, memory_cap=weights, dtype=torch.float32, pack="auto").get("tiny")
    assert lm.model.packed_bytes == 0 and lm.nbytes == weights


@pytest.mark.skipif("panel" not in KERNELS, reason="needs our kernels")
@pytest.mark.parametrize("plain_ms, one_op", [(0.98, True), (0.5, False)])
def test_a_slightly_faster_library_gemv_does_not_cost_the_one_op_step(monkeypatch, plain_ms, one_op):
    """Kinds are measured alone; a library GEMV a little faster on one kind must not push the whole decode step
    into the Python layer loop (engine.decode), which costs more than it saves. Much faster, it is kept."""
    from engine.decode import runner_for

    model = frozen_tiny("llama")
    reference = decode_logits(model, [1, 2, 3], 3)
    kinds = iter(["qkv", "o_proj", "gate_up", "down_proj", "head"])

    def timed(runs, n, reps=3):  # seconds per step of each candidate, as if measured
        kind = next(kinds)
        ms = {"panel x1": 1.0, "panel x8": 2.0, "plain x8": 5.0}
        if kind == "qkv":
            ms["plain x1"] = plain_ms
        return {name: ms.get(name, 9.0) * 1e-3 for name in runs}

    monkeypatch.setattr(prepack, "_seconds", timed)
    chosen = prepack.prepack_(model, "auto")
    # loss if switched: 1.0 - plain_ms ms against LOOP_COST_PER_LAYER x 2 layers = 0.12 ms
    assert chosen["qkv"] == ("panel[1-128 rows]" if one_op else "panel[2-128 rows]")
    assert all(chosen[k] == "panel[1-128 rows]" for k in ("o_proj", "gate_up", "down_proj", "head"))
    with torch.no_grad():
        assert (runner_for(model, 1).meta is not None) == one_op
    torch.testing.assert_close(decode_logits(model, [1, 2, 3], 3), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("panel" not in KERNELS, reason="needs our kernels")
@pytest.mark.parametrize("scratch_x8_ms, one_op", [(2.11, True), (2.15, False)])
def test_a_slightly_faster_library_gemm_does_not_cost_batched_steps_the_one_op_step(monkeypatch, scratch_x8_ms,
                                                                                      one_op):
    """The same for batched steps: oneDNN a little faster than ours at 8 rows on one kind must not send every
    batched step (and each adapter piece's call) through the Python layer loop; much faster, it is kept."""
    from engine.decode import runner_for

    model = frozen_tiny("llama")
    reference = decode_logits(model, [1, 2, 3], 3)
    kinds = iter(["qkv", "o_proj", "gate_up", "down_proj", "head"])

    def timed(runs, n, reps=3):
        kind = next(kinds)
        ms = {"panel x1": 1.0, "panel x8": 2.0, "plain x8": 5.0}
        if kind == "gate_up":  # ours wins one row; oneDNN wins 8 (by more than MIN_GAIN over scratch)
            ms = {"scratch x1": 1.0, "onednn x8": 2.0, "scratch x8": scratch_x8_ms, "plain x8": 5.0}
        return {name: ms.get(name, 9.0) * 1e-3 for name in runs}

    monkeypatch.setattr(prepack, "_seconds", timed)
    chosen = prepack.prepack_(model, "auto")
    # loss if switched: scratch_x8_ms - 2.0 ms against LOOP_COST_PER_LAYER x 2 layers = 0.12 ms
    assert chosen["gate_up"] == ("scratch[1-8 rows]" if one_op else "scratch[1 row]+onednn[2-8 rows]")
    with torch.no_grad():
        assert runner_for(model, 1).meta is not None  # one row: one op either way
        assert (runner_for(model, 4).meta is not None) == one_op
    torch.testing.assert_close(decode_logits(model, [1, 2, 3], 3), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("ours", ["panel", "dpbf16"])
@pytest.mark.parametrize("other_x8_ms, clearly", [(1.9, False), (1.5, True)])
def test_panels_that_win_one_row_also_take_batches_unless_clearly_slower(ours, other_x8_ms, clearly, amx,
                                                                          monkeypatch):
    """Panels (PANEL_ROWS) and dot-product panels (DP_ROWS, but on AMX CPUs) serve prefill chunks as well; where
    their copy exists for one row anyway, an 8-row figure a little behind another kernel's does not send prefill
    to another kernel; clearly behind (more than PREFILL_SHARE), or where they serve decode batches only, it does."""
    monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    pws = {name: [prepack.PackedWeight(name, torch.zeros(1), torch.ones(1), ())] for name in ("scratch", ours)}
    times = {"plain x1": 5.0, "plain x8": 9.0, "scratch x1": 3.0, f"{ours} x1": 2.0, f"{ours} x8": 2.0,
             "scratch x8": other_x8_ms}
    prefill = {"panel": prepack.PANEL_ROWS, "dpbf16": prepack.BATCH_ROWS if amx else prepack.DP_ROWS}[ours]
    keeps = not clearly and prefill > prepack.BATCH_ROWS
    want = f"{ours}[1-{prefill} rows]" if keeps else f"{ours}[1 row]+scratch[2-8 rows]"
    assert prepack._pick(pws, times)[0].label == want


@pytest.mark.parametrize("batch", ["panel", "dpbf16"])
@pytest.mark.parametrize("scratch_x1_ms, want_one", [(1.9, "batch"), (1.65, "batch"), (1.5, "scratch")])
def test_one_row_takes_the_batches_kernel_unless_row_form_is_clearly_faster(batch, scratch_x1_ms, want_one):
    """Our batch kernel within SAME_KERNEL_SHARE of the row-form one at one row serves one row too (the same bits
    alone and in a batch, and no flip from load to load); clearly slower, the row-form kernel keeps one row, but
    never against dot-product panels (their one-row figure may come from a slow spell of the memory)."""
    pws = {name: [prepack.PackedWeight(name, torch.zeros(1), torch.ones(1), ())] for name in ("scratch", batch)}
    times = {"plain x1": 5.0, "plain x8": 9.0, "scratch x1": scratch_x1_ms, f"{batch} x1": 2.0, f"{batch} x8": 2.0,
             "scratch x8": 4.0}
    rows = prepack._prefill_rows(batch)  # prefill chunks too (see the test below)
    if batch == "dpbf16":  # dot-product panels: one row always (see SAME_KERNEL_SHARE)
        want_one = "batch"
    want = f"{batch}[1-{rows} rows]" if want_one == "batch" else f"scratch[1 row]+{batch}[2-{rows} rows]"
    assert prepack._pick(pws, times)[0].label == want


@pytest.mark.skipif(not (kernels.available() and kernels.has_avx512_bf16()),
                    reason="bf16 dot-product panels run on AVX512-BF16 CPUs only")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_dot_product_panels_give_the_plain_bf16_logits(family):
    """A bf16 model packed for vdpbf16ps decodes to the plain bf16 model's logits (float32 accumulation both, in
    another order: within a few bf16 steps), and a float32 model cannot take that packing."""
    model = frozen_tiny(family).to(torch.bfloat16)
    plain = decode_logits(model, [5, 17, 42], 6).float()
    chosen = prepack.prepack_(model, "dpbf16")
    assert set(chosen.values()) == {f"dpbf16[1-{prepack._prefill_rows('dpbf16')} rows]"}
    assert model.blocks[0].attn._qkv.packed.packed.shape[-2:] == (64, 2)
    torch.testing.assert_close(decode_logits(model, [5, 17, 42], 6).float(), plain, rtol=0.02, atol=0.05)
    fp32 = frozen_tiny(family)
    assert set(prepack.prepack_(fp32, "dpbf16").values()) == {"plain"}


@pytest.mark.skipif(not (kernels.available() and kernels.has_avx512_vnni()),
                    reason="int8 dot-product panels run on AVX512-VNNI CPUs only")
@pytest.mark.parametrize("rows_s", [2.0, 0.9, 0.5])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int8_bf16_models_decode_through_int8_dot_product_panels(family, rows_s, monkeypatch):
    """A quantized bf16 model gets int8 dot-product panels (vpdpbusd on the int8 weights and the activations
    quantized to 16 bits): the row-form int8 kernel's products up to that quantization (within a few bf16 steps),
    for decode steps and prefill chunks; one row runs them too unless the row-form kernel measures more than
    INT8_ROWS_SHARE faster at load (forced here); greedy decoding with the cache equals the uncached path."""
    import copy

    from engine.quant import quantize_int8_

    model = frozen_tiny(family).to(torch.bfloat16)
    quantize_int8_(model)
    rows_form = copy.deepcopy(model)  # a deep copy drops packed copies: the row-form int8 kernel
    rows_form.head_int8 = model.head_int8
    real = prepack._seconds
    times = {"packed": 1.0, "rows": rows_s}
    monkeypatch.setattr(prepack, "_seconds", lambda runs, n, **kw: times if set(runs) == set(times)
                        else real(runs, n, **kw))
    chosen = prepack.prepack_(model, "auto")
    one_row = rows_s * prepack.INT8_ROWS_SHARE >= 1.0  # 0.9: the row-form kernel not clearly faster
    want = "int8 dp panel" if one_row else f"int8 rows[1 row]+dp panel[2-{prepack.PANEL_ROWS} rows]"
    assert set(chosen.values()) == {want}, chosen
    pw = model.blocks[0].mlp.down_proj.packed
    assert pw.kernel == "dpi8" and pw.packed.dtype == torch.uint8 and pw.packed.shape[-2:] == (64, 4)
    assert pw.serves(prepack.PANEL_ROWS) and (pw.for_rows(1) is pw) == one_row
    torch.testing.assert_close(decode_logits(model, [5, 17, 42], 6).float(),
                               decode_logits(rows_form, [5, 17, 42], 6).float(), rtol=0.02, atol=0.05)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
    assert list(generate_tokens(model, [3, 9, 27], cfg)) == list(generate_uncached(model, [3, 9, 27], cfg))
    if one_row:  # every row count on the same exact-integer sums: a row's logits alone == in a batch, bit for bit
        prompts = ([5, 17, 42], [9, 8], [1, 2, 3, 4])
        cache = KVCache.build(model.config, 3, 32, dtype=torch.bfloat16)
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):
                model(torch.tensor([prompt]), cache=cache.rows(row, row + 1))
            together = model(torch.tensor([[7], [8], [9]]), cache=cache)
            for row, prompt in enumerate(prompts):
                alone = KVCache.build(model.config, 1, 32, dtype=torch.bfloat16)
                model(torch.tensor([prompt]), cache=alone)
                torch.testing.assert_close(model(torch.tensor([[7 + row]]), cache=alone)[0], together[row],
                                           rtol=0, atol=0)
        runner = model._decode_runners[3]
        assert {runner.meta[i + j] for i in range(0, len(runner.meta), decode.META) for j in (3, 5, 7, 9)} == {4}


def _advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding ``address`` carries MADV_HUGEPAGE (``hg`` in its smaps VmFlags)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_huge_page_buffer_is_aligned_zeroed_and_advised():
    buf = prepack.huge_page_buffer(3 * prepack.HUGE_PAGE + 100)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * prepack.HUGE_PAGE + 100
    assert buf.data_ptr() % prepack.HUGE_PAGE == 0
    assert not buf.any()
    assert _advised_for_huge_pages(buf.data_ptr()) and _advised_for_huge_pages(buf.data_ptr() + buf.numel() - 1)
    view = buf[64:128].view(torch.float32)
    del buf
    view.fill_(2.0)  # a view keeps the mapping alive
    assert view.sum().item() == 32.0


def test_huge_page_buffer_without_transparent_huge_pages_is_ordinary_memory(monkeypatch):
    """A kernel without THP refuses the advice (EINVAL): the buffer is still there, zeroed and usable."""
    import mmap
    import types

    class NoHugePages(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    fake = types.SimpleNamespace(**{n: getattr(mmap, n) for n in ("MADV_HUGEPAGE", "MAP_PRIVATE", "MAP_ANONYMOUS")},
                                 mmap=NoHugePages)
    monkeypatch.setattr(prepack, "mmap", fake)
    buf = prepack.huge_page_buffer(prepack.HUGE_PAGE + 8)
    assert buf.numel() == prepack.HUGE_PAGE + 8 and not buf.any()
    assert not _advised_for_huge_pages(buf.data_ptr())
    buf[-8:].view(torch.float64).fill_(3.0)
    assert buf[-8:].view(torch.float64).item() == 3.0


def _our_copies(model: GPT) -> list[torch.Tensor]:
    with torch.no_grad():  # as prepack_ walks them (the fused q/k/v and gate/up weights are for frozen inference)
        return [t.put.get().packed for t in prepack.decode_weights(model) if t.put.get() is not None]


@pytest.mark.parametrize("kernel,dtype", [("panel", torch.float32), ("dpbf16", torch.bfloat16), ("int8", None)])
def test_our_packed_copies_share_one_huge_page_buffer_and_decode_the_same(kernel, dtype, monkeypatch):
    """Every copy our kernels stream sits in one buffer advised for huge pages (a model's copies under 2 MB stay
    where packing put them: here the threshold is lowered to the tiny model's size); the copies are the packer's
    bytes, and the logits are bit for bit those of the same copies in ordinary memory."""
    if not kernels.available() or (kernel != "panel" and not kernels.has_avx512_bf16()):
        pytest.skip("our dot-product kernels need AVX512-BF16")  # the panel case runs everywhere with our kernels
    from engine.quant import quantize_int8_

    def packed_model() -> GPT:
        model = frozen_tiny("llama").to(dtype or torch.bfloat16)
        if kernel == "int8":
            quantize_int8_(model)
        prepack.prepack_(model, "dpbf16" if kernel == "int8" else kernel)
        return model

    ordinary = packed_model()  # 2 MB threshold: this model's ~0.1 MB of copies stay in ordinary memory
    assert len({c.untyped_storage().data_ptr() for c in _our_copies(ordinary)}) > 1
    monkeypatch.setattr(prepack, "HUGE_PAGE", 4096)
    model = packed_model()
    copies = _our_copies(model)
    assert len(copies) == 2 * 4 + 1  # 2 layers x (qkv, o, gate/up, down) + the tied head
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1
    spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))  # no overlap
    assert _advised_for_huge_pages(copies[0].data_ptr())
    for a, b in zip(_our_copies(ordinary), copies, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(decode_logits(model, [5, 17, 42], 6), decode_logits(ordinary, [5, 17, 42], 6))
