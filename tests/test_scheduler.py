"""Continuous batching (engine.scheduler): batched == single, joins/leaves, per-row adapters and sampling,
cancellation within one step, bounded queue, KV memory bound, fairness of chunked prefill."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import EngineBusy
from engine.generate import generate_tokens
from engine.lora import BatchLora
from engine.model import GPT
from engine.registry import Registry
from engine.requests import Request
from engine.sampling import GenerationConfig
from engine.scheduler import Scheduler
from weights import store

LLAMA = ModelConfig(vocab_size=257, context_length=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
GPT2 = ModelConfig(vocab_size=257, context_length=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128)
NO_EOS = {"type": "none", "eos_token_ids": []}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, cfg, seed in (("tiny-llama", LLAMA, 0), ("tiny-gpt2", GPT2, 1)):
        torch.manual_seed(seed)
        store.add_model(name, cfg.to_dict(), GPT(cfg).state_dict(), tokenizer=NO_EOS, prompt_format="none", root=root)
    peft = pytest.importorskip("peft")
    base = Registry(root, dtype=torch.float32).get("tiny-llama")
    for i, name in enumerate(("a", "b", "c")):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(base.model), peft.LoraConfig(
            r=4 + 4 * i, lora_alpha=16, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        folder = store.adapter_dir("tiny-llama", name, root)
        pm.save_pretrained(str(folder))
        (folder / "scratchchat.json").write_text(json.dumps({"base": "tiny-llama", "base_sha256": base.sha256}))
    return root


@pytest.fixture
def registry(root):
    return Registry(root, dtype=torch.float32)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _run(sched: Scheduler, reqs: list[Request]) -> list[list[int]]:
    handles = [sched.submit(r) for r in reqs]
    out = []
    for h in handles:
        ids = [t for d in h for t in d.token_ids]
        out.append(ids)
    return out


def _reference(lm, prompt: list[int], cfg: GenerationConfig, adapter=None) -> list[int]:
    lora = None if adapter is None else BatchLora([adapter])
    return list(generate_tokens(lm.model, prompt, cfg, lora=lora))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_equals_single_greedy(registry, name):
    lm = registry.get(name)
    cfg = GenerationConfig(max_new_tokens=24)
    prompts = _prompts(6)
    sched = Scheduler(max_batch=4, prefill_chunk=8)  # 6 requests on 4 rows: rows leave and others join
    try:
        got = _run(sched, [Request(lm, None, p, cfg) for p in prompts])
    finally:
        sched.close()
    for p, g in zip(prompts, got, strict=True):
        assert g == _reference(lm, p, cfg)
        assert len(g) == 24


def test_requests_join_while_others_decode(registry):
    lm = registry.get("tiny-llama")
    prompts = _prompts(4, seed=3)
    cfgs = [GenerationConfig(max_new_tokens=n) for n in (40, 5, 30, 12)]
    sched = Scheduler(max_batch=8, prefill_chunk=4)
    try:
        first = sched.submit(Request(lm, None, prompts[0], cfgs[0]))
        it = iter(first)
        head = [next(it).token_ids[0] for _ in range(5)]  # request 0 is decoding now
        rest = _run(sched, [Request(lm, None, p, c) for p, c in zip(prompts[1:], cfgs[1:])])
        tail = [t for d in it for t in d.token_ids]
    finally:
        sched.close()
    assert head + tail == _reference(lm, prompts[0], cfgs[0])
    for p, c, g in zip(prompts[1:], cfgs[1:], rest, strict=True):
        assert g == _reference(lm, p, c)


def test_mixed_adapters_share_a_batch(registry):
    lm = registry.get("tiny-llama")
    ads = [None, registry.get_adapter(lm, "a"), registry.get_adapter(lm, "b"), registry.get_adapter(lm, "c")]
    prompts = _prompts(4, seed=5)
    cfg = GenerationConfig(max_new_tokens=16)
    sched = Scheduler(max_batch=4)
    try:
        got = _run(sched, [Request(lm, a, p, cfg) for a, p in zip(ads, prompts)])
    finally:
        sched.close()
    refs = [_reference(lm, p, cfg, a) for a, p in zip(ads, prompts)]
    assert got == refs
    # the adapters matter: the same prompt under "a" and base differ
    assert _reference(lm, prompts[1], cfg) != refs[1]


def test_requests_arriving_together_prefill_in_one_pass(registry):
    """Requests admitted together (here: while a decoding request holds the model) prefill as one padded pass of
    several rows: different prompt lengths, adapters, a session prefix (rows starting at different positions), and
    one cancelled after admission; each then decodes exactly what it decodes alone."""
    from engine.kv_cache import KVCache

    lm = registry.get("tiny-llama")
    ads = [registry.get_adapter(lm, "a"), None, registry.get_adapter(lm, "b"), None]
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 36, 40, 33)]
    prefix = KVCache.build(LLAMA, 1, 64)
    with torch.no_grad():
        lm.model(torch.tensor([prompts[1][:10]]), cache=prefix)  # the second request reuses 10 cached tokens
    calls = iter([False])  # the cancelled one: not when admitted, then cancelled before its pass
    reqs = [Request(lm, ads[0], prompts[0], GenerationConfig(max_new_tokens=12)),
            Request(lm, ads[1], prompts[1], GenerationConfig(max_new_tokens=12), prefix=prefix, prefix_len=10),
            Request(lm, ads[2], prompts[2], GenerationConfig(max_new_tokens=12)),
            Request(lm, ads[3], prompts[3], GenerationConfig(max_new_tokens=12), should_stop=lambda: next(calls, True))]
    shapes = []
    hook = lm.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    sched = Scheduler(max_batch=8)
    stop = threading.Event()
    try:
        first = iter(sched.submit(Request(lm, None, [1, 2, 3], GenerationConfig(max_new_tokens=200),
                                          should_stop=stop.is_set)))
        next(first)  # decoding
        with lm.lock:  # the scheduler waits for the model: these four queue up and are admitted together
            order = [0, 3, 1, 2]  # the cancelled one second: the rows after it move down
            by_order = {i: sched.submit(reqs[i]) for i in order}
            handles = [by_order[i] for i in range(4)]
        got = [[t for d in h for t in d.token_ids] for h in handles]
        stop.set()
        list(first)
    finally:
        hook.remove()
        sched.close()
    assert (3, 40) in shapes  # one pass: rows of 30, 26 (after the prefix) and 40 tokens, padded to 40
    assert handles[3].result.finish_reason == "cancelled" and got[3] == []
    for i in range(3):
        assert got[i] == _reference(lm, prompts[i], GenerationConfig(max_new_tokens=12), ads[i]), i
    assert handles[1].result.cached_tokens == 10


def test_per_row_seeded_sampling_is_reproducible_in_a_batch(registry):
    lm = registry.get("tiny-gpt2")
    prompts = _prompts(3, seed=7)
    cfgs = [GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=50, seed=s) for s in (1, 2, 3)]
    sched = Scheduler(max_batch=4)
    try:
        together = _run(sched, [Request(lm, None, p, c) for p, c in zip(prompts, cfgs)])
        alone = [_run(sched, [Request(lm, None, p, c)])[0] for p, c in zip(prompts, cfgs)]
    finally:
        sched.close()
    assert together == alone
    assert together[0] != together[1]


def test_cancel_returns_within_one_step_and_frees_the_row(registry):
    lm = registry.get("tiny-llama")
    stop = threading.Event()
    sched = Scheduler(max_batch=2)
    try:
        h = sched.submit(Request(lm, None, [1, 2, 3], GenerationConfig(max_new_tokens=200), should_stop=stop.is_set))
        it = iter(h)
        for _ in range(5):
            next(it)
        steps_at_stop = sched.steps  # the consumer may lag behind the scheduler: count the scheduler's steps
        stop.set()
        rest = list(it)
        assert h.result.finish_reason == "cancelled" and rest[-1].finish_reason == "cancelled"
        assert sched.steps - steps_at_stop <= 1  # at most the step that was already running
        assert h.result.completion_tokens < 200
        deadline = time.time() + 5
        while sched.is_busy("tiny-llama") and time.time() < deadline:
            time.sleep(0.01)
        assert not sched.is_busy("tiny-llama")
        # the freed row serves the next request normally
        cfg = GenerationConfig(max_new_tokens=8)
        assert _run(sched, [Request(lm, None, [4, 5, 6], cfg)])[0] == _reference(lm, [4, 5, 6], cfg)
    finally:
        sched.close()


def test_abandoned_iteration_cancels(registry):
    lm = registry.get("tiny-llama")
    sched = Scheduler(max_batch=2)
    try:
        h = sched.submit(Request(lm, None, [1, 2, 3], GenerationConfig(max_new_tokens=10_000 // 100)))
        for _ in h:
            break  # the consumer walks away: the generator's close cancels the request
        deadline = time.time() + 5
        while sched.is_busy("tiny-llama") and time.time() < deadline:
            time.sleep(0.01)
        assert not sched.is_busy("tiny-llama")
    finally:
        sched.close()


def test_bounded_queue_raises_busy(registry):
    lm = registry.get("tiny-llama")
    stop = threading.Event()
    sched = Scheduler(max_batch=1, max_queue=2)
    try:
        long = GenerationConfig(max_new_tokens=200)
        first = iter(sched.submit(Request(lm, None, [1, 2], long, should_stop=stop.is_set)))
        next(first)  # decoding: its single row is taken (keep the iterator: dropping it cancels the request)
        waiting = [sched.submit(Request(lm, None, [3], long, should_stop=stop.is_set)) for _ in range(2)]
        with pytest.raises(EngineBusy, match="busy"):
            sched.submit(Request(lm, None, [4], long))
        stop.set()
        list(first)
        for h in waiting:
            list(h)
            assert h.result.finish_reason == "cancelled"
    finally:
        sched.close()


def test_kv_memory_bound_limits_rows(registry):
    lm = registry.get("tiny-llama")
    per_row = 2 * LLAMA.n_layers * LLAMA.n_kv_heads * LLAMA.head_dim * 4 * LLAMA.context_length
    sched = Scheduler(max_batch=8, kv_memory=3 * per_row)
    try:
        cfg = GenerationConfig(max_new_tokens=6)
        prompts = _prompts(5, seed=9)
        got = _run(sched, [Request(lm, None, p, cfg) for p in prompts])
        assert sched.stats()["pools"]["tiny-llama"]["rows"] == 3
        assert sched.stats()["pools"]["tiny-llama"]["kv_bytes"] <= 3 * per_row
    finally:
        sched.close()
    assert got == [_reference(lm, p, cfg) for p in prompts]


def test_chunked_prefill_does_not_stall_decoding_rows(registry):
    lm = registry.get("tiny-llama")
    sched = Scheduler(max_batch=4, prefill_chunk=8)
    stop = threading.Event()
    try:
        a = sched.submit(Request(lm, None, [1, 2, 3], GenerationConfig(max_new_tokens=200), should_stop=stop.is_set))
        it = iter(a)
        next(it)
        long_prompt = _prompts(1, seed=11)[0] * 4 + [7] * 40  # > 8 chunks of 8 tokens
        steps_before = sched.steps
        b = sched.submit(Request(lm, None, long_prompt, GenerationConfig(max_new_tokens=3)))
        b_tokens = [t for d in b for t in d.token_ids]
        steps_during = sched.steps - steps_before
        stop.set()
        list(it)
    finally:
        sched.close()
    n_chunks = -(-len(long_prompt) // 8)
    # one decode step of A ran alongside every prefill chunk of B (B's own 2 decode steps come on top)
    assert steps_during >= n_chunks - 1
    assert b_tokens == _reference(lm, long_prompt, GenerationConfig(max_new_tokens=3))


def test_stop_strings_never_leak(registry):
    lm = registry.get("tiny-gpt2")
    cfg = GenerationConfig(max_new_tokens=40)
    prompt = _prompts(1, seed=13)[0]
    sched = Scheduler(max_batch=2)
    try:
        full = lm.tokenizer.decode(_run(sched, [Request(lm, None, prompt, cfg)])[0])
        stop = full[10:13]  # a 3-character string the greedy answer is known to contain
        h = sched.submit(Request(lm, None, prompt, cfg, stop_strings=(stop,)))
        pieces = [d.text for d in h]
    finally:
        sched.close()
    text = "".join(pieces)
    assert text == full[: full.index(stop)]
    assert h.result.finish_reason == "stop"
    assert all(stop not in p for p in pieces)


class _ScriptedModel(torch.nn.Module):
    """Emits a fixed byte script after any prompt of length ``prompt_len`` (row-independent), through a real cache."""

    def __init__(self, config: ModelConfig, script: bytes, prompt_len: int) -> None:
        super().__init__()
        self.config, self.script, self.prompt_len = config, script, prompt_len

    def forward(self, idx, *, cache=None, positions=None, lora=None, last_only=False):
        plan = cache.plan(idx.shape[1], positions)
        cache.commit(plan)
        nxt = plan.positions[:, -1] + 1 - self.prompt_len  # (B,) index into the script of the next token
        logits = torch.full((idx.shape[0], 1, self.config.vocab_size), -1e9)
        for row, i in enumerate(nxt.tolist()):
            logits[row, 0, self.script[i] if i < len(self.script) else 0] = 0.0
        return logits


def test_utf8_whole_characters_and_stop_hold_back_through_the_scheduler(registry):
    from dataclasses import replace

    text = "héllo 👋 wörld, 日本語 ### Response: tail"
    lm = registry.get("tiny-gpt2")
    fake = replace(lm, model=_ScriptedModel(lm.config, text.encode(), prompt_len=3))
    sched = Scheduler(max_batch=2)
    try:
        n = len(text.encode())
        h = sched.submit(Request(fake, None, [1, 2, 3], GenerationConfig(max_new_tokens=n)))
        pieces = [d.text for d in h]
        stopped = sched.submit(Request(fake, None, [1, 2, 3], GenerationConfig(max_new_tokens=n),
                                       stop_strings=("\n\n### Response:", " ### Response:")))
        stop_pieces = [d.text for d in stopped]
    finally:
        sched.close()
    assert "".join(pieces) == text and h.result.finish_reason == "length"
    assert all("\ufffd" not in p for p in pieces)
    assert "👋" in pieces and "日" in pieces  # each emitted whole, in the delta of its last byte
    assert "".join(stop_pieces) == "héllo 👋 wörld, 日本語"
    assert all("#" not in p for p in stop_pieces) and stopped.result.finish_reason == "stop"


class _BrokenModel(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, idx, **kwargs):
        raise RuntimeError("boom")


def test_a_failing_forward_fails_its_requests_and_the_engine_keeps_serving(registry):
    from dataclasses import replace

    from engine.errors import EngineError

    lm = registry.get("tiny-llama")
    broken = replace(registry.get("tiny-gpt2"), model=_BrokenModel(GPT2))
    sched = Scheduler(max_batch=2)
    try:
        h = sched.submit(Request(broken, None, [1, 2], GenerationConfig(max_new_tokens=4)))
        with pytest.raises(EngineError, match="boom"):
            list(h)
        cfg = GenerationConfig(max_new_tokens=5)
        assert _run(sched, [Request(lm, None, [3, 4], cfg)])[0] == _reference(lm, [3, 4], cfg)
    finally:
        sched.close()


def test_a_bad_request_fails_alone_and_the_thread_lives_on(registry):
    from engine.errors import EngineError

    lm = registry.get("tiny-llama")
    sched = Scheduler(max_batch=2)
    try:
        bad = sched.submit(Request(lm, None, [1, 2], GenerationConfig(max_new_tokens=4, temperature=1.0,
                                                                      seed=2**70)))
        with pytest.raises(EngineError, match="bad request"):
            list(bad)
        cfg = GenerationConfig(max_new_tokens=5)
        assert _run(sched, [Request(lm, None, [3, 4], cfg)])[0] == _reference(lm, [3, 4], cfg)
    finally:
        sched.close()


def test_a_script_exits_cleanly_while_the_scheduler_thread_works(root):
    """A script that returns while the scheduler thread is still generating (here: after the first token of a long
    answer) exits with code 0: the thread is stopped at exit, not torn down inside a torch op (which aborted the
    process about half the time)."""
    script = f"""
import torch
from engine.registry import Registry
from engine.requests import Request
from engine.sampling import GenerationConfig
from engine.scheduler import Scheduler
lm = Registry({str(root)!r}, dtype=torch.float32).get("tiny-llama")
h = Scheduler().submit(Request(lm, None, [1, 2, 3], GenerationConfig(max_new_tokens=250)))
next(iter(h))
"""
    for _ in range(4):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-2000:]
