"""Chat sessions (engine.sessions): cache reuse across turns, cache invalidation (the wrong-adapter bug), context
overflow, cancellation, defaults from the manifest, errors; plus the real SmolLM2 answering a two-turn chat."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import AdapterMismatch, ContextTooLong, EngineError, UnknownModel
from engine.model import GPT
from engine.prompts import get_prompt_format as get_format
from engine.sampling import GenerationConfig
from engine.sessions import ChatSession, Engine
from weights import store

LLAMA = ModelConfig(vocab_size=257, context_length=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
GPT2 = ModelConfig(vocab_size=257, context_length=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128)
NO_EOS = {"type": "none", "eos_token_ids": []}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = GenerationConfig(max_new_tokens=12)


def _save_adapter(root, base: str, name: str, seed: int, *, base_name: str | None = None) -> None:
    peft = pytest.importorskip("peft")
    manifest, state = store.read(base, root)
    model = GPT(ModelConfig.from_dict(manifest["config"]))
    model.load_state_dict(state)
    torch.manual_seed(seed)
    targets = [t for t in TARGETS if t != "gate_proj" or manifest["config"]["mlp"] == "swiglu"]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                  init_lora_weights=False))
    folder = store.adapter_dir(base, name, root)
    pm.save_pretrained(str(folder))
    meta = {"base": base_name or base, "base_sha256": manifest["sha256"]}
    (folder / "scratchchat.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    store.add_model("tiny-chat", LLAMA.to_dict(), GPT(LLAMA).state_dict(), tokenizer=NO_EOS, prompt_format="chatml",
                    root=root, generation={"temperature": 0.7, "top_k": 40, "max_new_tokens": 64},
                    system_prompt="You are tiny.")
    torch.manual_seed(1)
    store.add_model("tiny-alpaca", GPT2.to_dict(), GPT(GPT2).state_dict(), tokenizer=NO_EOS, prompt_format="alpaca",
                    root=root)
    _save_adapter(root, "tiny-chat", "a", 10)
    _save_adapter(root, "tiny-chat", "b", 11)
    _save_adapter(root, "tiny-chat", "foreign", 12, base_name="some-other-model")
    return root


@pytest.fixture
def engine(root):
    eng = Engine(root, dtype=torch.float32)
    yield eng
    eng.close()


def _answer(session, text, cfg=GREEDY) -> tuple[str, list[int]]:
    ids, parts = [], []
    for d in session.stream(text, cfg):
        ids += d.token_ids
        parts.append(d.text)
    return "".join(parts), ids


def _fresh(engine, model, adapter, history, system=None):
    s = engine.new_session(model, adapter=adapter, system_prompt=system)
    s.history = [dict(m) for m in history]
    return s


@pytest.mark.parametrize("model", ["tiny-chat", "tiny-alpaca"])
def test_cache_reused_across_turns_and_equal_to_fresh(engine, model):
    s = engine.new_session(model)
    _answer(s, "hello")
    assert s.last_usage.cached_tokens == 0
    turn1_prompt = s.last_usage.prompt_tokens
    history = list(s.history)
    text2, ids2 = _answer(s, "and then?")
    # at least the whole first prompt (with bytes as tokens, the answer's text re-encodes to the same ids too)
    assert s.last_usage.cached_tokens >= turn1_prompt
    fresh = _fresh(engine, model, None, history)
    assert _answer(fresh, "and then?")[1] == ids2
    assert fresh.last_usage.cached_tokens == 0
    assert s.history[-1] == {"role": "assistant", "content": text2}


def test_switching_adapter_discards_the_cache(engine):
    """Regression for llama.cpp #26207 / vLLM #42125: a prompt cache reused under another adapter."""
    s = engine.new_session("tiny-chat", adapter="a")
    _answer(s, "hello")
    history = list(s.history)
    s.set_adapter("b")
    _, got = _answer(s, "tell me more")
    assert s.last_usage.cached_tokens == 0 and s.last_usage.adapter == "b"
    _, want = _answer(_fresh(engine, "tiny-chat", "b", history), "tell me more")
    assert got == want
    # and the adapter makes a difference on this very prompt, so a stale cache would have been caught
    _, with_a = _answer(_fresh(engine, "tiny-chat", "a", history), "tell me more")
    assert with_a != want
    history = list(s.history)
    s.set_adapter(None)
    _, got = _answer(s, "ok")
    assert s.last_usage.cached_tokens == 0
    assert got == _answer(_fresh(engine, "tiny-chat", None, history), "ok")[1]


def test_new_adapter_version_discards_the_cache(root, engine):
    _save_adapter(root, "tiny-chat", "v", 20)
    s = engine.new_session("tiny-chat", adapter="v")
    _answer(s, "hello")
    history = list(s.history)
    _save_adapter(root, "tiny-chat", "v", 21)  # a finetune run overwrote the adapter
    _, got = _answer(s, "again")
    assert s.last_usage.cached_tokens == 0
    assert got == _answer(_fresh(engine, "tiny-chat", "v", history), "again")[1]


def test_system_prompt_change_discards_the_cache(engine):
    s = engine.new_session("tiny-chat")
    assert s.system_prompt == "You are tiny."  # the manifest's default
    _answer(s, "hello")
    history = list(s.history)
    s.set_system_prompt("You are a pirate.")
    _, got = _answer(s, "again")
    assert s.last_usage.cached_tokens == 0
    assert got == _answer(_fresh(engine, "tiny-chat", None, history, system="You are a pirate."), "again")[1]


def _short_turns(s: ChatSession, n: int) -> list:
    """``n`` turns of "message number i" with 8-token answers; the usage of each."""
    usages = []
    for i in range(n):
        _answer(s, f"message number {i}", GenerationConfig(max_new_tokens=8))
        usages.append(s.last_usage)
    return usages


def test_overflow_drops_oldest_turns_keeps_system_prompt(root):
    eng = Engine(root, dtype=torch.float32, max_context=160)
    try:
        s = eng.new_session("tiny-chat")
        assert sum(u.truncated_turns for u in _short_turns(s, 6)) > 0  # 6 turns of ~40 tokens do not fit 160
        assert len(s.history) == 12  # the caller's history keeps everything
        lm = eng.load("tiny-chat")
        kept = s._first_turn
        msgs = [{"role": "system", "content": "You are tiny."}] + s.history[2 * kept:] + [
            {"role": "user", "content": "last"}]
        ids = lm.prompt_format.encode_chat(msgs, lm.tokenizer)
        assert lm.tokenizer.decode(ids).startswith("<|im_start|>system\nYou are tiny.")
        _, got = _answer(s, "last", GenerationConfig(max_new_tokens=8))
        fresh = _fresh(eng, "tiny-chat", None, s.history[2 * kept : -2])
        assert got == _answer(fresh, "last", GenerationConfig(max_new_tokens=8))[1]
        # one message longer than the context: a clear error, and the session still works afterwards
        with pytest.raises(ContextTooLong, match="context"):
            _answer(s, "x" * 500)
        _answer(s, "short again", GenerationConfig(max_new_tokens=4))
        assert s.last_usage.finish_reason == "length"
    finally:
        eng.close()


def test_a_trim_goes_down_to_three_quarters_so_the_next_turns_reuse_the_cache(root):
    """Dropping a turn changes everything after the system prompt (a full re-prefill): so a trim drops down to 3/4 of
    the context, and the turns after it prefill only their own tokens again."""
    eng = Engine(root, dtype=torch.float32, max_context=400)
    try:
        usages = _short_turns(eng.new_session("tiny-chat"), 14)
        trims = [i for i, u in enumerate(usages) if u.truncated_turns]
        assert trims, "14 turns must outgrow 400 tokens"
        for i in trims:
            assert usages[i].prompt_tokens + 8 <= 0.75 * 400  # 8: the room reserved for the answer
        after = [usages[i + 1] for i in trims if i + 1 < len(usages)]
        assert after and all(u.truncated_turns == 0 and u.cached_tokens > 0.5 * u.prompt_tokens for u in after), \
            [(u.truncated_turns, u.prompt_tokens, u.cached_tokens) for u in usages]
    finally:
        eng.close()


def test_cancel_keeps_partial_answer(engine):
    s = engine.new_session("tiny-chat")
    polls = []

    def should_stop() -> bool:  # polled by the scheduler before every step; says "stop" at the 4th poll
        polls.append(1)
        return len(polls) >= 4

    text = "".join(d.text for d in s.stream("go on forever", GenerationConfig(max_new_tokens=200), should_stop))
    assert s.last_usage.finish_reason == "cancelled"
    assert s.last_usage.completion_tokens <= 4 and len(polls) == 4  # nothing ran after the stop
    assert s.history[-1] == {"role": "assistant", "content": text}


def test_generation_defaults_and_listing(root, engine):
    cfg = engine.generation_defaults("tiny-chat")
    assert (cfg.temperature, cfg.top_k, cfg.max_new_tokens) == (0.7, 40, 64)
    assert engine.generation_defaults("tiny-alpaca") == GenerationConfig()
    names = {m.name: m for m in engine.list_models()}
    assert set(names) >= {"tiny-chat", "tiny-alpaca"}
    assert {"a", "b"} <= set(names["tiny-chat"].adapters)
    assert names["tiny-alpaca"].prompt_format == "alpaca"
    # a model added while the engine runs shows up without a restart
    torch.manual_seed(3)
    store.add_model("tiny-late", GPT2.to_dict(), GPT(GPT2).state_dict(), tokenizer=NO_EOS, root=root)
    assert "tiny-late" in {m.name for m in engine.list_models()}
    assert engine.new_session("tiny-late").complete("hi", GenerationConfig(max_new_tokens=3)) is not None


def test_errors_are_clear_and_engine_keeps_serving(engine):
    with pytest.raises(UnknownModel, match="nope"):
        engine.new_session("nope")
    with pytest.raises(UnknownModel, match="available"):
        engine.new_session("tiny-chat", adapter="missing")
    s = engine.new_session("tiny-chat")
    with pytest.raises(AdapterMismatch, match="some-other-model"):
        s.set_adapter("foreign")
    assert s.adapter is None
    assert isinstance(AdapterMismatch("x"), EngineError)
    assert _answer(s, "still here?")[1]


async def test_astream(engine):
    s = engine.new_session("tiny-chat")
    ids = []
    async for d in s.astream("hello", GREEDY):
        ids += d.token_ids
    assert s.last_usage.completion_tokens == len(ids) == GREEDY.max_new_tokens
    want = _answer(engine.new_session("tiny-chat"), "hello")[1]
    assert ids == want
    # many sessions at once through asyncio: all answered, each equal to its solo answer
    sessions = [engine.new_session("tiny-chat") for _ in range(4)]

    async def run(sess, text):
        out = []
        async for d in sess.astream(text, GREEDY):
            out += d.token_ids
        return out

    texts = [f"user {i}" for i in range(4)]
    results = await asyncio.gather(*(run(x, t) for x, t in zip(sessions, texts)))
    for t, r in zip(texts, results):
        assert r == _answer(engine.new_session("tiny-chat"), t)[1]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, None], ids=["fp32", "default-dtype"])
def test_smollm2_two_turn_chat(smollm2_store, dtype):
    # with its default system prompt SmolLM2's first greedy token is a near tie ("The" 25.33 vs "L" 25.24 in fp32),
    # so this also guards the bf16 numerics of the default dtype (float32 residual stream, float32 top-k logits)
    eng = Engine(smollm2_store, dtype=dtype)
    try:
        s = eng.new_session("smollm2-135m-instruct")
        cfg = GenerationConfig(max_new_tokens=30)
        first = s.complete("What is the capital of France?", cfg)
        assert "Paris" in first
        second = s.complete("What is its population?", cfg)
        assert s.last_usage.cached_tokens > 20
        assert second.strip()
    finally:
        eng.close()


def test_merged_adapter_serves_every_row_like_unmerged(engine):
    want = {ad: _answer(engine.new_session("tiny-chat", adapter=ad), "merge me")[1] for ad in (None, "a", "b")}
    lm = engine.load("tiny-chat")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    engine.merge_adapter("tiny-chat", "a")
    try:
        for ad in (None, "a", "b"):
            assert _answer(engine.new_session("tiny-chat", adapter=ad), "merge me")[1] == want[ad], ad
    finally:
        engine.unmerge_adapter("tiny-chat")
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    engine.unload_adapter("tiny-chat", "a")
    assert "a" not in lm.adapters
    assert _answer(engine.new_session("tiny-chat", adapter="a"), "merge me")[1] == want["a"]


def test_lru_evicts_idle_bases_under_the_memory_cap(root):
    eng = Engine(root, dtype=torch.float32, memory_cap=1)  # room for one model at a time
    try:
        a = eng.new_session("tiny-chat")
        _answer(a, "hi")
        assert eng.registry.loaded() == ["tiny-chat"]
        b = eng.new_session("tiny-alpaca")
        _answer(b, "hi")
        assert eng.registry.loaded() == ["tiny-alpaca"]
        history = list(a.history)
        _, got = _answer(a, "back again")  # reloaded on demand from the same files: the cache is still valid
        assert a.last_usage.cached_tokens > 0
        assert eng.registry.loaded() == ["tiny-chat"]
        assert got == _answer(_fresh(eng, "tiny-chat", None, history), "back again")[1]
    finally:
        eng.close()


def test_reimported_model_with_another_format_discards_the_cache(root, engine):
    manifest, state = store.read("tiny-chat", root)
    store.add_model("tiny-fmt", manifest["config"], state, tokenizer=NO_EOS, prompt_format="chatml", root=root)
    s = engine.new_session("tiny-fmt")
    _answer(s, "hello")
    history = list(s.history)
    # re-imported under the same name with another prompt format (atomic replace of the folder)
    store.add_model("tiny-fmt", manifest["config"], state, tokenizer=NO_EOS, prompt_format="phi3", root=root,
                    overwrite=True)
    _, got = _answer(s, "again")
    assert s.last_usage.cached_tokens == 0
    assert engine.load("tiny-fmt").prompt_format.name == "phi3"
    assert got == _answer(_fresh(engine, "tiny-fmt", None, history), "again")[1]


def test_adapter_trained_on_another_format_uses_it_and_switching_discards_the_cache(root, engine):
    _save_adapter(root, "tiny-chat", "alp", 30)
    meta_path = store.adapter_dir("tiny-chat", "alp", root) / "scratchchat.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "prompt_format": "alpaca"}))
    lm = engine.load("tiny-chat")
    assert engine.prompt_format(lm, "alp").name == "alpaca" and engine.prompt_format(lm, "a").name == "chatml"

    s = engine.new_session("tiny-chat", adapter="a")  # chatml, with the manifest's system prompt
    _answer(s, "hello")
    history = list(s.history)
    s.set_adapter("alp")
    _, got = _answer(s, "and now?")
    assert s.last_usage.cached_tokens == 0
    # exactly the Alpaca rendering (with Alpaca's own preamble, not the chatml system prompt) under adapter alp
    ids = get_format("alpaca").encode_chat(history + [{"role": "user", "content": "and now?"}], lm.tokenizer)
    assert s.last_usage.prompt_tokens == len(ids)
    want = [t for d in engine.submit("tiny-chat", ids, GREEDY, adapter="alp") for t in d.token_ids]
    assert got == want


def test_idle_session_caches_stay_under_their_memory_budget(root):
    eng = Engine(root, dtype=torch.float32)
    try:
        sessions = [eng.new_session("tiny-chat") for _ in range(3)]
        _answer(sessions[0], "hello")
        one = eng.session_cache_bytes()
        assert one > 0
        eng.session_cache_memory = int(2.5 * one)  # room for two caches of this size
        for s in sessions[1:]:
            _answer(s, "hello")
        assert eng.session_cache_bytes() <= eng.session_cache_memory
        assert sessions[0]._cache is None and sessions[2]._cache is not None  # the least recently used went
        history = list(sessions[0].history)
        _, got = _answer(sessions[0], "again")  # simply re-prefilled
        assert sessions[0].last_usage.cached_tokens == 0
        assert got == _answer(_fresh(eng, "tiny-chat", None, history), "again")[1]
    finally:
        eng.close()


def test_next_turn_keeps_the_answer_as_sampled(tmp_path, gpt2_tokenizer_dir):
    """A sampled answer need not be BPE's canonical split of its text: the next turn keeps the cached ids (the same
    text) instead of prefilling everything after the first re-encoding difference, and generates exactly what an
    uncached run on those ids generates."""
    from engine.generate import generate_uncached
    from weights.store import gpt2_tokenizer_entry

    cfg = ModelConfig(vocab_size=50257, context_length=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                      ffn_dim=64)
    tokenizer, files = gpt2_tokenizer_entry(gpt2_tokenizer_dir / "encoder.json", gpt2_tokenizer_dir / "vocab.bpe")
    torch.manual_seed(3)
    store.add_model("tiny-bpe", cfg.to_dict(), GPT(cfg).state_dict(), tokenizer={**tokenizer, "eos_token_ids": []},
                    files=files, prompt_format="alpaca", root=tmp_path)
    eng = Engine(tmp_path, dtype=torch.float32)
    try:
        s = eng.new_session("tiny-bpe")
        text1, ids1 = _answer(s, "Name a city.", GenerationConfig(max_new_tokens=16, temperature=1.0, seed=0))
        tok = eng.load("tiny-bpe").tokenizer
        assert tok.encode(text1) != ids1  # a random model's answer is not the canonical split of its text
        prompt1 = s.last_usage.prompt_tokens
        _, ids2 = _answer(s, "Another one?", GenerationConfig(max_new_tokens=16))
        u = s.last_usage
        fed = s._cache.ids[: u.prompt_tokens]  # the ids this turn ran on
        assert fed[:prompt1 + 15] == s._cache.ids[:prompt1] + ids1[:15]  # the sampled answer, kept
        assert u.cached_tokens >= prompt1 + 15  # only the new turn's text was prefilled
        assert tok.decode(fed) == get_format("alpaca").render(s.history[:-1], add_generation_prompt=True)
        model = eng.load("tiny-bpe").model
        assert ids2 == list(generate_uncached(model, fed, GenerationConfig(max_new_tokens=16)))
    finally:
        eng.close()
