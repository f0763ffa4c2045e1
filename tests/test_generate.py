"""Generation: stop strings with hold-back (table-driven, scripted model and tokenizer), whole UTF-8 characters,
EOS, cancellation within one step, max_new_tokens, cached == uncached greedy, the async wrapper, and a real chat
with SmolLM2-135M-Instruct from the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import ModelConfig
from engine.generate import (
    Delta,
    TextStream,
    astream_generate,
    generate_tokens,
    generate_uncached,
    stream_generate,
)
from engine.kv_cache import KVCache
from engine.model import GPT
from engine.prompts import get_prompt_format
from engine.sampling import GenerationConfig
from engine.tokenizer import Tokenizer, load_gpt2_tokenizer, load_tokenizer

GPT2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
GREEDY = GenerationConfig(max_new_tokens=64, temperature=0.0)


class ScriptedTokenizer(Tokenizer):
    """Token id i stands for the bytes ``pieces[i]``; the last id is EOS."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces) + [b"<|endoftext|>"]
        self.eos_token_ids = (len(self.pieces) - 1,)
        self.vocab_size = len(self.pieces)
        self.special_tokens = frozenset({"<|endoftext|>"})

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]

    def special_id(self, token: str) -> int:
        return self.eos_token_ids[0]


class ScriptedModel(nn.Module):
    """Returns logits whose argmax is ``script[call]`` on forward call number ``call`` (prefill is call 0)."""

    def __init__(self, script: list[int], vocab_size: int, context_length: int = 256) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=4, n_layers=1,
                                  n_heads=1, n_kv_heads=1, ffn_dim=4)
        self.tok_emb = nn.Embedding(vocab_size, 4)
        self.script = script
        self.calls = 0

    def forward(self, idx, *, cache=None, positions=None, lora=None, last_only=False):
        if cache is not None:
            cache.commit(cache.plan(idx.shape[1], positions))
        logits = torch.full((idx.shape[0], 1 if last_only else idx.shape[1], self.config.vocab_size), -10.0)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def run_script(pieces: list[bytes], script_pieces: list[int], stop_strings=(), max_new_tokens=64, **kw):
    tok = ScriptedTokenizer(pieces)
    model = ScriptedModel(script_pieces, tok.vocab_size)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    deltas = list(stream_generate(model, tok, [0], cfg, stop_strings=stop_strings, **kw))
    return deltas, model, tok


EOS = -1  # placeholder in scripts, replaced by the scripted tokenizer's EOS id

# (pieces, script of piece indices, stop strings, expected text, expected finish reason)
STOP_CASES = [
    pytest.param([b"Hello", b"\n\n###", b" Instruction:", b"more"], [0, 1, 2, 3], ["\n\n### Instruction:"],
                 "Hello", "stop", id="stop-across-tokens"),
    pytest.param([b"x<|im_end|>y", b"z"], [0, 1], ["<|im_end|>"], "x", "stop", id="stop-inside-one-token"),
    pytest.param([b"<|im_end|>", b"z"], [0, 1], ["<|im_end|>"], "", "stop", id="stop-first"),
    pytest.param([b"a", b"\n\n", b"#", b"b"], [0, 1, 2, 3], ["\n\n### Instruction:"], "a\n\n#b", "length",
                 id="false-alarm-released"),
    pytest.param([b"a", b"\n<|us", b"er|>", b"b"], [0, 1, 2, 3], ["\n<|user|>", "\n\n### Input:"], "a", "stop",
                 id="phi3-user"),
    pytest.param([b"ab", b"cd", b"ef"], [0, 1, 2], ["de", "cdef"], "ab", "stop", id="earliest-stop-wins"),
    pytest.param([b"a", b"\n\n", b"###"], [0, 1, 2, EOS], ["\n\n### Instruction:"], "a\n\n###", "stop",
                 id="eos-releases-held"),
    pytest.param([b"a", b"\n"], [0, 1, 1], ["\n\n### Response:"], "a\n\n", "length", id="length-releases-held"),
    pytest.param([b"ok ", b"\xf0\x9f", b"\xa6\x99", b"!", b"z"], [0, 1, 2, 3, 4], ["\U0001f999!"], "ok ", "stop",
                 id="stop-string-with-split-emoji"),
]


@pytest.mark.parametrize("pieces, script, stops, expected, reason", STOP_CASES)
def test_stop_strings_never_leak(pieces, script, stops, expected, reason):
    eos = len(pieces)
    script = [eos if s == EOS else s for s in script]
    deltas, _, _ = run_script(pieces, script, stop_strings=stops, max_new_tokens=len(script))
    text = "".join(d.text for d in deltas)
    assert text == expected
    assert all(s not in text for s in stops)
    assert deltas[-1].finish_reason == reason
    assert deltas[-1].usage.finish_reason == reason
    assert all(d.finish_reason is None for d in deltas[:-1])
    # every partial stream is a prefix of the final text: nothing was streamed and later taken back
    streamed = ""
    for d in deltas:
        streamed += d.text
        assert expected.startswith(streamed)


def test_hold_back_deltas_exactly():
    deltas, _, _ = run_script([b"a", b"\n\n", b"#", b"b"], [0, 1, 2, 3], ["\n\n### Instruction:"], 4)
    assert [d.text for d in deltas] == ["a", "", "", "\n\n#b", ""]
    assert [d.token_ids for d in deltas] == [[0], [1], [2], [3], []]


def test_text_stream_direct():
    tok = ScriptedTokenizer([b"foo", b"STO", b"P", b"bar"])
    stream = TextStream(tok, ["STOP"], stop_ids=tok.eos_token_ids)
    assert stream.push(0) == "foo"
    assert stream.push(1) == ""
    assert stream.push(2) == "" and stream.stopped and stream.finish_reason == "stop"
    assert stream.push(3) == ""
    assert stream.text == "foo"
    stream = TextStream(tok, ["STOP"], stop_ids=tok.eos_token_ids)
    stream.push(0), stream.push(1)
    assert stream.finish("cancelled") == "STO"
    assert stream.finish_reason == "cancelled" and stream.text == "fooSTO"
    with pytest.raises(ValueError, match="finish reason"):
        TextStream(tok).finish("done")


def test_eos_stops_and_is_not_yielded():
    tok = ScriptedTokenizer([b"a", b"b", b"c"])
    eos = tok.eos_token_ids[0]
    model = ScriptedModel([0, 1, eos, 2], tok.vocab_size)
    gen = generate_tokens(model, [0], GREEDY, stop_ids=tok.eos_token_ids)
    out = []
    with pytest.raises(StopIteration) as done:
        while True:
            out.append(next(gen))
    assert out == [0, 1]
    assert done.value.value == "stop"
    assert model.calls == 3  # prefill + 2 decode steps; nothing after EOS
    deltas = list(stream_generate(ScriptedModel([0, 1, eos, 2], tok.vocab_size), tok, [0], GREEDY))
    assert "".join(d.text for d in deltas) == "ab"
    assert eos not in [t for d in deltas for t in d.token_ids]
    assert deltas[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("cancel_after", [0, 1, 3])
def test_should_stop_cancels_within_one_step(cancel_after):
    tok = ScriptedTokenizer([b"a", b"b"])
    model = ScriptedModel([0, 1] * 50, tok.vocab_size)
    flag = {"stop": cancel_after == 0}
    got = []
    for delta in stream_generate(model, tok, [0], GREEDY, should_stop=lambda: flag["stop"]):
        got += delta.token_ids
        if len(got) >= cancel_after:
            flag["stop"] = True  # the user presses stop while this token is shown
    assert len(got) == cancel_after
    assert model.calls == cancel_after  # no forward pass after the flag was raised
    assert delta.finish_reason == "cancelled"


def test_max_new_tokens():
    tok = ScriptedTokenizer([b"a"])
    model = ScriptedModel([0], tok.vocab_size)
    ids = list(generate_tokens(model, [0, 0, 0], GenerationConfig(max_new_tokens=5)))
    assert ids == [0] * 5
    assert model.calls == 5  # prefill + 4 decode steps: the last token is never fed back
    deltas = list(stream_generate(ScriptedModel([0], tok.vocab_size), tok, [0, 0, 0],
                                  GenerationConfig(max_new_tokens=5)))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.prompt_tokens == 3 and deltas[-1].usage.completion_tokens == 5
    assert deltas[-1].usage.ttft_s > 0 and deltas[-1].usage.decode_tokens_per_s > 0


def test_context_limits():
    tok = ScriptedTokenizer([b"a"])
    model = ScriptedModel([0], tok.vocab_size, context_length=8)
    with pytest.raises(ValueError, match="9 tokens exceeds the context length 8"):
        generate_tokens(model, [0] * 9, GREEDY)
    # a prompt of 6 leaves room for 2 fed tokens + 1 final one: generation ends with "length"
    assert len(list(generate_tokens(model, [0] * 6, GREEDY))) == 3
    cache = KVCache.build(model.config, 1, 8)
    with pytest.raises(ValueError, match="exceed the cache size"):
        generate_tokens(model, [0] * 9, GREEDY, cache=cache)


def test_cfg_stop_is_merged():
    tok = ScriptedTokenizer([b"one", b" END", b"two"])
    model = ScriptedModel([0, 1, 2], tok.vocab_size)
    deltas = list(stream_generate(model, tok, [0], GenerationConfig(stop=(" END",))))
    assert "".join(d.text for d in deltas) == "one"


# ---------------------------------------------------------------- UTF-8 with the real GPT-2 tokenizer

@pytest.fixture(scope="module")
def gpt2():
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    return load_gpt2_tokenizer(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")


def test_emoji_split_across_tokens_is_emitted_whole(gpt2):
    text = "Llama: 🦙 and 中文 ok"
    ids = gpt2.encode(text)
    assert len(gpt2.encode("🦙")) == 3  # GPT-2 spells the llama emoji with three byte-level tokens
    model = ScriptedModel(ids, gpt2.vocab_size)
    deltas = list(stream_generate(model, gpt2, [0], GenerationConfig(max_new_tokens=len(ids))))
    assert all("\ufffd" not in d.text for d in deltas)
    assert "🦙" in [d.text.strip() for d in deltas]
    assert "".join(d.text for d in deltas) == text


# ---------------------------------------------------------------- real (tiny, random) models

def tiny(family: str, n_kv_heads: int = 2) -> GPT:
    torch.manual_seed(123)
    if family == "gpt2":
        cfg = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                          ffn_dim=128)
    else:
        cfg = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=n_kv_heads, ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope",
                          rope_base=100000.0, bias=False, qkv_bias=False)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so greedy paths are not flat
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_equals_uncached_greedy(family):
    model = tiny(family)
    prompt = [5, 17, 42, 99, 3]
    cfg = GenerationConfig(max_new_tokens=30)
    cached = list(generate_tokens(model, prompt, cfg))
    uncached = list(generate_uncached(model, prompt, cfg))
    assert cached == uncached
    assert len(cached) == 30 and len(set(cached)) > 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_equals_uncached_seeded_sampling(family):
    model = tiny(family)
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.2,
                           presence_penalty=0.3, seed=11)
    assert list(generate_tokens(model, [1, 2, 3], cfg)) == list(generate_uncached(model, [1, 2, 3], cfg))
    assert list(generate_tokens(model, [1, 2, 3], cfg)) == list(generate_tokens(model, [1, 2, 3], cfg))


def test_continue_a_session_cache():
    """A cache that already holds turn 1 is continued with only the new tokens (multi-turn reuse)."""
    model = tiny("llama")
    turn1, turn2 = [5, 6, 7, 8], [9, 10]
    cfg = GenerationConfig(max_new_tokens=8)
    cache = KVCache.build(model.config, 1, 48)
    reply = list(generate_tokens(model, turn1, cfg, cache=cache))
    assert int(cache.lengths[0]) == len(turn1) + len(reply) - 1  # the last reply token was not fed
    continued = list(generate_tokens(model, [reply[-1]] + turn2, cfg, cache=cache))
    fresh = list(generate_tokens(model, turn1 + reply + turn2, cfg))
    assert continued == fresh


def test_astream_matches_sync_and_cancels():
    model = tiny("gpt2")
    tok = ScriptedTokenizer([bytes([i]) for i in range(32, 127)] + [b"?"] * (256 - 95))
    cfg = GenerationConfig(max_new_tokens=12)
    calls = {"n": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    async def collect(limit=None):
        out = []
        async with contextlib.aclosing(astream_generate(model, tok, [1, 2, 3], cfg, stop_ids=())) as deltas:
            async for d in deltas:
                out.append(d)
                if limit is not None and len(out) == limit:
                    break
        return out, calls["n"]  # read right after the generator closed, inside the running loop

    sync = list(stream_generate(model, tok, [1, 2, 3], cfg, stop_ids=()))
    calls["n"] = 0
    got, _ = asyncio.run(collect())
    assert [(d.text, d.token_ids) for d in got] == [(d.text, d.token_ids) for d in sync]
    assert isinstance(got[-1], Delta) and got[-1].finish_reason == "length"

    calls["n"] = 0
    partial, n_calls = asyncio.run(collect(limit=3))
    assert len(partial) == 3
    assert n_calls <= 4  # at most one step beyond what was consumed; the worker has finished when aclose returns

    async def cancel_task():
        seen = asyncio.Event()

        async def consume():
            async for d in astream_generate(model, tok, [1, 2, 3], GenerationConfig(max_new_tokens=40), stop_ids=()):
                if d.token_ids:
                    seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return calls["n"]

    calls["n"] = 0
    model.register_forward_hook(lambda *a: time.sleep(0.02))  # 40 tokens would take >= 0.8 s
    assert asyncio.run(cancel_task()) < 20  # the stop flag ended the worker long before max_new_tokens


def test_astream_propagates_errors():
    model = tiny("gpt2")
    tok = ScriptedTokenizer([b"a"] * 256)

    async def go():
        async for _ in astream_generate(model, tok, [1] * 100, GREEDY):
            pass

    with pytest.raises(ValueError, match="exceeds the context length"):
        asyncio.run(go())


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_chat_answers_paris(smollm2_store, dtype):
    """fp32 and bf16 both answer. bf16 regression: with a bf16 residual stream (HF's layout) the default system
    prompt turned the answer into "L'Étoile de la Cité..."; the float32 residual stream fixes it."""
    from weights import store

    root = smollm2_store

    name = "smollm2-135m-instruct"
    manifest, state_dict = store.read(name, root=root)
    config = ModelConfig.from_dict(manifest["config"])
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    model = model.to(dtype).eval()
    tokenizer = load_tokenizer(store.model_dir(name, root=root), manifest["tokenizer"])
    fmt = get_prompt_format(manifest["prompt_format"])
    assert fmt.name == "chatml"
    system = manifest.get("system_prompt") or SMOLLM2_SYSTEM
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}]
    ids = fmt.encode_chat(messages, tokenizer)
    assert ids[0] == tokenizer.special_id("<|im_start|>")
    deltas = list(stream_generate(model, tokenizer, ids, GenerationConfig(max_new_tokens=40),
                                  stop_strings=fmt.stop_strings))
    answer = "".join(d.text for d in deltas)
    assert "Paris" in answer, answer
    assert "<|im_end|>" not in answer
    assert deltas[-1].finish_reason in ("stop", "length")
