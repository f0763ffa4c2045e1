"""engine.threads: work runs in a thread that is gone afterwards, results and errors come back, grad mode and the
intra-op thread count follow the caller; the registry loads models that way."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.threads import openmp_workers, run_in_fresh_thread


def test_runs_in_another_thread_that_exits():
    seen = {}

    def work() -> int:
        seen["thread"] = threading.current_thread()
        seen["grad"] = torch.is_grad_enabled()
        seen["threads"] = torch.get_num_threads()
        return 42

    with torch.no_grad():
        assert run_in_fresh_thread(work) == 42
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()
    assert seen["grad"] is False and seen["threads"] == torch.get_num_threads()


def test_errors_are_raised_in_the_caller():
    def work() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_in_fresh_thread(work)


def test_registry_loads_in_a_fresh_thread(tmp_path, monkeypatch):
    from engine import registry as reg_mod
    from engine.config import ModelConfig
    from engine.model import GPT
    from weights import store

    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32)
    store.add_model("t", cfg.to_dict(), GPT(cfg).state_dict(), tokenizer={"type": "none"}, prompt_format="none",
                    root=tmp_path)
    threads = []
    real = reg_mod.Registry._load

    def spy(self, name):
        threads.append(threading.current_thread())
        return real(self, name)

    monkeypatch.setattr(reg_mod.Registry, "_load", spy)
    reg_mod.Registry(tmp_path, dtype=torch.float32).get("t")
    assert threads and threads[0] is not threading.current_thread() and threads[0].name == "scratchchat-load"


# Run in a process of its own (pytest's main thread has long run parallel torch work): the ways the app and the API
# reach the engine, from long-lived worker threads as asyncio.to_thread gives them, leave exactly the scheduler's
# OpenMP team in the process; then the check itself is shown to see a stray team.
_SERVING = r"""
import json, sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from fastapi.testclient import TestClient
from engine.api import build_app
from engine.sampling import GenerationConfig
from engine.sessions import Engine
from engine.threads import openmp_workers

torch.set_num_threads(2)
engine = Engine(sys.argv[1], dtype=torch.float32)
pool = ThreadPoolExecutor(2)  # long-lived, as the event loop's default executor
cfg = GenerationConfig(max_new_tokens=8)
prompt = "a question about the old city by the river " * 3

def chat():
    s = engine.new_session("mid")
    s.complete(prompt, cfg)
    s.set_adapter("ad")
    s.complete(prompt, cfg)
    engine.merge_adapter("mid", "ad")
    engine.new_session("mid", adapter="ad").complete(prompt, cfg)
    engine.unmerge_adapter("mid")

pool.submit(chat).result()
client = TestClient(build_app(engine))
for model, stream in (("mid", False), ("mid:ad", True)):
    r = client.post("/v1/chat/completions", json={"model": model, "stream": stream, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
time.sleep(0.5)
serving = openmp_workers()
pool.submit(lambda: torch.randn(1_000_000).mul(2)).result()  # a long-lived thread's own parallel op
time.sleep(0.5)
print(json.dumps({"serving": serving, "stray": openmp_workers()}))
engine.close()
"""


def test_serving_leaves_only_the_schedulers_openmp_team(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("peft")
    from e2e_helpers import add_tiny_adapter

    from engine.config import ModelConfig
    from engine.model import GPT
    from weights import store

    if openmp_workers() is None:
        pytest.skip("needs Linux /proc")
    # large enough that its ops fork (a tiny model's never do, and the check could not fail)
    cfg = ModelConfig(vocab_size=257, context_length=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=1024, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
    torch.manual_seed(0)
    store.add_model("mid", cfg.to_dict(), GPT(cfg).state_dict(), prompt_format="chatml", root=tmp_path,
                    tokenizer={"type": "none", "eos_token_ids": []})
    add_tiny_adapter(tmp_path, "mid", "ad", rank=8, targets=("q_proj", "down_proj"))

    out = subprocess.run([sys.executable, "-c", _SERVING, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["serving"] == 1  # the scheduler's team at two threads: one worker
    assert seen["stray"] == 2  # the check sees a second team when one is left behind
