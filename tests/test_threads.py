"""engine.threads: work runs in a thread that is gone afterwards, results and errors come back, grad mode and the
intra-op thread count follow the caller; the registry loads models that way."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.threads import run_in_fresh_thread


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
