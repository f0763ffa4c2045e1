"""engine.decode: the resolved decode loop, and its one-op form (decode_blocks), compute exactly what the modules
compute (both families, one row and rows at different lengths, float32 / bf16 / int8, with per-row adapters), and it
never runs stale: an in-place weight change, a requantized
or repacked weight, a peft wrapper, inference tensors or a deep copy all make it rebuild or step aside."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import engine.model
from engine import decode, kernels, prepack
from engine.config import ModelConfig
from engine.generate import generate_tokens, generate_uncached
from engine.kv_cache import KVCache
from engine.model import GPT
from engine.quant import quantize_int8_
from engine.sampling import GenerationConfig

pytestmark = pytest.mark.skipif(not kernels.cpu_supported(), reason="the decode runner needs our AVX2 kernels")

LLAMA = ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
GPT2 = ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256)
PROMPTS = ([5, 17, 42], [9, 8], [1, 2, 3, 4])


def frozen(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 7) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
            p.requires_grad_(False)
    return model


def steps(model: GPT, n: int = 5) -> torch.Tensor:
    """Prefill three rows of different lengths one by one, then ``n`` batched decode steps: (3, n, vocab)."""
    cache = KVCache.build(model.config, 3, 32, dtype=model.tok_emb.weight.dtype)
    with torch.inference_mode():
        for row, prompt in enumerate(PROMPTS):
            model(torch.tensor([prompt]), cache=cache.rows(row, row + 1))
        out = [model(torch.tensor([[7 + t], [8 + t], [9 + t]]), cache=cache) for t in range(n)]
        single = KVCache.build(model.config, 1, 32, dtype=model.tok_emb.weight.dtype)
        model(torch.tensor([PROMPTS[0]]), cache=single)
        one = [model(torch.tensor([[7 + t]]), cache=single) for t in range(n)]
    return torch.cat(out, dim=1), torch.cat(one, dim=1)


def through_modules(model: GPT, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    with monkeypatch.context() as m:
        m.setattr(engine.model, "runner_for", lambda model, rows: None)
        return steps(model)


def used_runner(model: GPT) -> set[int]:
    return set(model.__dict__.get("_decode_runners", {}))


def assert_runner_steps_equal_the_modules(model: GPT, monkeypatch) -> None:
    """The decode steps at one row and at three run the resolved runner and give the modules' logits bit for bit."""
    reference = through_modules(model, monkeypatch)
    got = steps(model)
    assert used_runner(model) == {1, 3}
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_runner_equals_the_modules_exactly(cfg, dtype, quant, monkeypatch):
    model = frozen(cfg, dtype)
    if quant == "int8":
        quantize_int8_(model)
    prepack.prepack_(model, "auto")
    assert_runner_steps_equal_the_modules(model, monkeypatch)
    gen = GenerationConfig(max_new_tokens=16)
    with torch.inference_mode():
        assert list(generate_tokens(model, PROMPTS[0], gen)) == list(generate_uncached(model, PROMPTS[0], gen))


def test_a_layernorm_bias_cast_apart_from_its_weight_decodes_through_the_module(monkeypatch):
    """A bf16 LayerNorm whose bias was cast to float32 on its own: the LayerNorm op takes neither, so that norm runs
    the module's own math in decode steps too (no error), and the steps still equal the modules exactly."""
    model = frozen(GPT2, torch.bfloat16)
    ln = model.blocks[0].attn_norm
    ln.bias = torch.nn.Parameter(ln.bias.detach().float(), requires_grad=False)
    prepack.prepack_(model, "auto")
    assert_runner_steps_equal_the_modules(model, monkeypatch)


def python_loop(monkeypatch_context) -> None:
    """Runners built inside this context run their Python layer loop instead of the one-op decode_blocks."""
    real = decode.DecodeRunner._fuse

    def unfused(self):
        real(self)
        self.meta = None

    monkeypatch_context.setattr(decode.DecodeRunner, "_fuse", unfused)


@pytest.mark.parametrize("pack", ["panel", "scratch"])
@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_every_block_in_one_op_equals_the_python_loop_and_the_modules(cfg, dtype, quant, pack, monkeypatch):
    """With our kernels on every projection (panels, row-form, int8) a decode step is one decode_blocks call; it
    runs the same kernels in the same order as the Python loop, so all three paths agree bit for bit."""
    model = frozen(cfg, dtype)
    if quant == "int8":
        quantize_int8_(model)
    prepack.prepack_(model, pack)
    reference = through_modules(model, monkeypatch)
    got = steps(model)
    runners = model._decode_runners
    assert set(runners) == {1, 3} and all(r.meta is not None for r in runners.values())
    assert all(r.head is not None for r in runners.values())  # embedding to logits in one op (decode_step)
    with monkeypatch.context() as m:
        python_loop(m)
        model.__dict__.pop("_decode_runners")
        looped = steps(model)
        assert all(r.meta is None for r in model._decode_runners.values())
    for a, b, c in zip(got, reference, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_decode_blocks_returns_a_tensor_of_its_own(cfg, monkeypatch):
    """Inside decode_blocks each layer's intermediates reuse the tensors of the layer before (no allocation per
    layer); what the op returns is still its own: the caller's residual stream is untouched, and a second call
    leaves the first call's result as it was (and both equal the Python loop's)."""
    model = frozen(cfg, torch.bfloat16)
    prepack.prepack_(model, "scratch")  # ours everywhere: the one-op step (auto may time a library GEMV faster)
    with torch.no_grad():
        runner = decode.DecodeRunner(model, 1)
        with monkeypatch.context() as m:
            python_loop(m)
            looped = decode.DecodeRunner(model, 1)
    assert runner.meta is not None
    assert looped.meta is None

    def step(run, x):
        cache = KVCache.build(model.config, 1, 32, dtype=torch.bfloat16)
        with torch.no_grad():
            model(torch.tensor([PROMPTS[0]]), cache=cache)
            plan = cache.plan(1)
            plan.decode_positions = plan.positions[:, 0].contiguous()
            plan.decode_tables = (model.rope_cos, model.rope_sin) if cfg.pos_emb == "rope" else (None, None)
            return run(x, cache, plan)

    x = torch.randn(1, cfg.d_model)
    x_before = x.clone()
    first = step(runner, x)
    kept = first.clone()
    second = step(runner, 2 * x)
    assert torch.equal(x, x_before) and torch.equal(first, kept)
    assert first.data_ptr() not in (second.data_ptr(), x.data_ptr())
    torch.testing.assert_close(first, step(looped, x), rtol=0, atol=0)
    torch.testing.assert_close(second, step(looped, 2 * x), rtol=0, atol=0)


def test_an_in_place_change_rebuilds_the_runner(monkeypatch):
    model = frozen(LLAMA)
    prepack.prepack_(model, "auto")
    steps(model)
    before = model._decode_runners[1]
    with torch.no_grad():
        model.blocks[1].attn.k_proj.weight.mul_(1.5)  # a view into the fused q/k/v weight
        model.blocks[0].mlp_norm.weight.add_(0.1)
    assert not before.valid(model)
    got = steps(model)
    assert model._decode_runners[1] is not before
    for a, b in zip(got, through_modules(model, monkeypatch), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_a_change_to_the_embedding_final_norm_or_head_rebuilds_the_whole_step(cfg, monkeypatch):
    """decode_step also reads the token (and position) embedding, the final norm and the head: each is watched."""
    for name in ["tok_emb", "norm_f"] + (["pos_emb"] if cfg.pos_emb == "learned" else []):
        model = frozen(cfg, torch.bfloat16)
        prepack.prepack_(model, "scratch")  # ours everywhere: the one-op step (auto may time a library GEMV faster)
        part = getattr(model, name).weight
        steps(model)
        before = model._decode_runners[1]
        assert before.head is not None
        with torch.no_grad():
            part.add_(0.25)
        assert not before.valid(model)
        got = steps(model)
        assert model._decode_runners[1] is not before
        for a, b in zip(got, through_modules(model, monkeypatch), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_untied_or_wrapped_head(monkeypatch):
    """An untied head (SmolLM2-360M style: lm_head a Linear) runs in the one op too; one that peft wraps leaves the
    forward's own Python tail to run it (the adapter's delta included), the blocks still in one op."""
    peft = pytest.importorskip("peft")
    cfg = dataclasses.replace(LLAMA, tie_embeddings=False)
    model = frozen(cfg, torch.bfloat16)
    prepack.prepack_(model, "scratch")  # ours everywhere: the one-op step (auto may time a library GEMV faster)
    plain = steps(model)
    assert model._decode_runners[1].head is not None
    for a, b in zip(plain, through_modules(model, monkeypatch), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    wrapped.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: a nonzero delta shows whether the wrapper ran
    with torch.no_grad():
        runner = decode.runner_for(model, 1)
    assert runner is not None and runner.meta is not None and runner.head is None
    got = steps(model)
    for a, b, c in zip(got, through_modules(model, monkeypatch), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


def test_the_per_step_check_catches_changes_without_rereading_every_slot(monkeypatch):
    """While nothing registers a parameter, buffer or submodule, valid() reads the tensors' data pointers and
    versions in C++ and never looks the slots up again (key() is not called); an in-place change or a ``.data``
    swap still fails it, and any registration (a replaced parameter, a module built elsewhere) sends it through
    the full check once."""
    model = frozen(LLAMA)
    prepack.prepack_(model, "auto")
    steps(model)
    runner = model._decode_runners[1]
    assert runner._watch is not None and runner.valid(model)
    full = decode._Keys.key
    calls = []
    monkeypatch.setattr(decode._Keys, "key", lambda self: calls.append(1) or full(self))
    assert runner.valid(model) and calls == []  # the fast form
    torch.nn.Linear(2, 2)  # registers two parameters somewhere else: one full check, then fast again
    assert runner.valid(model) and calls == [1]
    assert runner.valid(model) and calls == [1]
    with torch.no_grad():
        model.blocks[0].mlp.down_proj.weight.add_(0.5)  # in place: no registration
    assert not runner.valid(model) and calls == [1]
    steps(model)
    runner = model._decode_runners[1]
    norm = model.blocks[1].attn_norm
    norm.weight.data = norm.weight.data.clone()  # new storage, same Parameter object
    calls.clear()
    assert not runner.valid(model) and calls == []
    steps(model)
    runner = model._decode_runners[1]
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())  # a new Parameter: registered
    calls.clear()
    assert not runner.valid(model) and calls == [1]
    steps(model)
    runner = model._decode_runners[1]
    assert runner.valid(model)
    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: True)
    calls.clear()
    assert runner.valid(model) and calls == [1]  # model.to() would replace parameters unregistered: full check


def test_requantizing_or_repacking_rebuilds_the_runner():
    model = frozen(LLAMA)
    steps(model)
    first = model._decode_runners[1]
    prepack.prepack_(model, "auto")  # new packed copies
    assert not first.valid(model)
    steps(model)
    second = model._decode_runners[1]
    quantize_int8_(model)  # the weights move onto the int8 grid, new int8 copies
    assert not second.valid(model)


def test_peft_wrapped_projections_decode_through_the_modules():
    peft = pytest.importorskip("peft")
    model = frozen(LLAMA)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()
    assert decode.runner_for(model, 1) is None
    cache = KVCache.build(LLAMA, 1, 16)
    with torch.inference_mode():
        model(torch.tensor([[5, 6]]), cache=cache)
        model(torch.tensor([[7]]), cache=cache)
    assert used_runner(model) == set()


def test_inference_tensors_and_deep_copies():
    with torch.inference_mode():
        made_in_inference = frozen(LLAMA)
    assert decode.runner_for(made_in_inference, 1) is None  # no version counters to watch
    model = frozen(LLAMA)
    steps(model)
    assert used_runner(model)
    twin = copy.deepcopy(model)
    assert used_runner(twin) == set()  # bound to the original's tensors: not carried over
    torch.testing.assert_close(steps(twin)[0], steps(model)[0], rtol=0, atol=0)


# odd widths: products whose outputs end in a partial panel / panel group / tile, and an odd input width
LLAMA_ODD = ModelConfig(vocab_size=300, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=99, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
DP = pytest.mark.skipif(not (kernels.available() and kernels.has_avx512_bf16()),
                        reason="bf16 dot-product panels run on AVX512-BF16 CPUs only")


@pytest.mark.parametrize("dtype, pack", [
    (torch.float32, "off"), (torch.float32, "panel"), (torch.float32, "scratch"), (torch.bfloat16, "panel"),
    (torch.bfloat16, "scratch"), pytest.param(torch.bfloat16, "dpbf16", marks=DP)],
    ids=["fp32-off", "fp32-panel", "fp32-scratch", "bf16-panel", "bf16-scratch", "bf16-dpbf16"])
@pytest.mark.parametrize("cfg", [LLAMA, GPT2, LLAMA_ODD], ids=["llama", "gpt2", "llama-odd"])
def test_adapted_rows_equal_the_modules_exactly(cfg, dtype, pack, tmp_path, monkeypatch):
    """Rows with different adapters and none in one decode step, three rows and one: the runner applies the hook
    where the modules do, in its Python loop (PyTorch's kernels) or inside decode_blocks (our kernels, each
    product's delta added by the threads that computed its outputs), bit for bit."""
    import json

    peft = pytest.importorskip("peft")
    from engine.lora import BatchLora, load_adapter

    model = frozen(cfg)
    adapters = []
    for seed, targets in ((1, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]), (2, ["k_proj", "down_proj"])):
        torch.manual_seed(seed)
        folder = tmp_path / f"a{seed}"
        pm = peft.get_peft_model(copy.deepcopy(model).requires_grad_(True),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(str(folder))
        (folder / "scratchchat.json").write_text(json.dumps({"base": "tiny", "base_sha256": "abc"}))
        adapters.append(load_adapter(folder, cfg, base_name="tiny", base_sha256="abc", dtype=dtype))
    model = model.to(dtype)
    hook, one = BatchLora([adapters[0], None, adapters[1]]), BatchLora([adapters[0]])
    prepack.prepack_(model, pack)

    def run() -> torch.Tensor:
        cache, single = KVCache.build(cfg, 3, 32, dtype=dtype), KVCache.build(cfg, 1, 32, dtype=dtype)
        with torch.inference_mode():
            model(torch.tensor([[5, 17, 42], [9, 8, 1], [1, 2, 3]]), cache=cache, lora=hook)
            model(torch.tensor([[5, 17, 42]]), cache=single, lora=one)
            return torch.cat([torch.cat([model(torch.tensor([[7 + t], [8 + t], [9 + t]]), cache=cache, lora=hook),
                                         model(torch.tensor([[7 + t]]), cache=single, lora=one)])
                              for t in range(4)], dim=1)

    got = run()
    assert {1, 3} <= used_runner(model)
    assert all((r.meta is not None) == (pack != "off") for r in model._decode_runners.values())
    with monkeypatch.context() as m:
        m.setattr(engine.model, "runner_for", lambda model, rows: None)
        want = run()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if pack in ("panel", "dpbf16"):  # batch-invariant kernels: the adapted row alone == in the mixed batch
        torch.testing.assert_close(got[3], got[0], rtol=0, atol=0)


@pytest.mark.skipif(not (kernels.available() and kernels.has_avx512_bf16() and kernels.has_avx512_vnni()),
                    reason="dot-product panels run on AVX512-BF16 (bf16) and AVX512-VNNI (int8) CPUs only")
@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_dot_product_panels_in_one_op_equal_the_python_loop_and_the_modules(cfg, quant, monkeypatch):
    """bf16 weights packed for vdpbf16ps (kind 3 of decode_blocks), or int8 ones for vpdpbusd (kind 4): the one-op
    step, the Python loop and the modules run the same kernel on every projection, so they agree bit for bit at
    one row and at three."""
    model = frozen(cfg, torch.bfloat16)
    if quant == "int8":
        quantize_int8_(model)
    chosen = prepack.prepack_(model, "dpbf16")
    want = "int8 dp panel" if quant == "int8" else f"dpbf16[1-{prepack._prefill_rows('dpbf16')} rows]"
    assert set(chosen.values()) == {want}
    reference = through_modules(model, monkeypatch)
    got = steps(model)
    assert all(r.meta is not None for r in model._decode_runners.values())
    kind = 4 if quant == "int8" else 3
    for r in model._decode_runners.values():
        assert {r.meta[i + j] for i in range(0, len(r.meta), decode.META) for j in (3, 5, 7, 9)} == {kind}
    with monkeypatch.context() as m:
        python_loop(m)
        model.__dict__.pop("_decode_runners")
        looped = steps(model)
    for a, b, c in zip(got, reference, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(got[0][:1], got[1], rtol=0, atol=0)  # row 0 of the batch == the row alone
