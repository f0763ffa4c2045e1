"""The OpenAI-compatible API (engine.api) through the official ``openai`` client against a live uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from engine.config import ModelConfig
from engine.model import GPT
from engine.sampling import GenerationConfig
from engine.sessions import Engine
from weights import store

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

LLAMA = ModelConfig(vocab_size=257, context_length=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
KEY = "sk-test-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from engine.api import build_app

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    store.add_model("tiny", LLAMA.to_dict(), GPT(LLAMA).state_dict(), prompt_format="chatml", root=root,
                    tokenizer={"type": "none", "eos_token_ids": []}, generation={"max_new_tokens": 16})
    peft = pytest.importorskip("peft")
    manifest, state = store.read("tiny", root)
    model = GPT(LLAMA)
    model.load_state_dict(state)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    folder = store.adapter_dir("tiny", "ad", root)
    pm.save_pretrained(str(folder))
    (folder / "scratchchat.json").write_text(json.dumps({"base": "tiny", "base_sha256": manifest["sha256"]}))

    long_cfg = ModelConfig(**{**LLAMA.to_dict(), "context_length": 4096})
    store.add_model("tiny-long", long_cfg.to_dict(), GPT(long_cfg).state_dict(), prompt_format="chatml", root=root,
                    tokenizer={"type": "none", "eos_token_ids": []})

    engine = Engine(root, dtype=torch.float32, max_batch=2, max_queue=1)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, api_key=KEY), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield {"url": f"http://127.0.0.1:{port}/v1", "engine": engine}
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def _expected(engine, messages, n, adapter=None):
    ids = engine.encode_chat("tiny", messages)
    h = engine.submit("tiny", ids, GenerationConfig(max_new_tokens=n), adapter=adapter)
    return "".join(d.text for d in h)


def test_models_lists_bases_and_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert {"tiny", "tiny:ad", "tiny-long"} <= set(ids)


def test_chat_non_streaming_matches_engine(client, server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _expected(server["engine"], msgs, 10)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_chat_streaming_and_adapter(client, server):
    msgs = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(model="tiny:ad", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(server["engine"], msgs, 12, adapter="ad")
    assert text != _expected(server["engine"], msgs, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_stop_seed_and_top_k(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    full = r.choices[0].text
    stop = full[5:7]
    r2 = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert r2.choices[0].text == full[: full.index(stop)] and r2.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", prompt="abc", max_tokens=15, temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="nope", messages=[{"role": "user", "content": "x"}]), 404, "model"),
    (dict(model="tiny:nope", messages=[{"role": "user", "content": "x"}]), 404, "model"),
    (dict(model="tiny", messages=[]), 400, "messages"),
    (dict(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1), 400, "temperature"),
    (dict(model="tiny", messages=[{"role": "user", "content": "x"}], top_p=1.5), 400, "top_p"),
    (dict(model="tiny", messages=[{"role": "user", "content": "x" * 500}]), 400, None),
    (dict(model="tiny", messages=[{"role": "robot", "content": "x"}]), 400, "messages.0.role"),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(client, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(max_tokens=4, **kwargs)
    assert exc.value.status_code == status
    err = exc.value.body
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    if status == 400 and param is None:
        assert err["code"] == "context_length_exceeded"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok"}], max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_api_key_is_checked(server):
    bad = openai.OpenAI(base_url=server["url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_busy_is_429(client, server, monkeypatch):
    from engine.scheduler import Scheduler

    real = Scheduler._decode_step

    def slow(self, pool):  # the tiny model's 100 tokens take a few ms on a fast CPU: keep the rows busy meanwhile
        time.sleep(0.005)
        real(self, pool)

    monkeypatch.setattr(Scheduler, "_decode_step", slow)
    engine = server["engine"]
    stop = threading.Event()
    lm = engine.load("tiny")
    # fill both rows and the one queue slot with long requests, then the API gets "busy"
    holders = []  # iterators kept alive: dropping one cancels its request
    for _ in range(2):
        h = engine.submit("tiny", [1, 2, 3], GenerationConfig(max_new_tokens=100), should_stop=stop.is_set)
        holders.append(iter(h))
        next(holders[-1])  # decoding now
    queued = engine.submit("tiny", [1], GenerationConfig(max_new_tokens=100), should_stop=stop.is_set)
    try:
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert exc.value.body["code"] == "engine_busy"
    finally:
        stop.set()
        for it in [*holders, iter(queued)]:
            list(it)
    assert lm.name == "tiny"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_client_disconnect_cancels_the_request(server, monkeypatch):
    import httpx

    engine = server["engine"]
    handles = []
    submit = engine.scheduler.submit
    monkeypatch.setattr(engine.scheduler, "submit", lambda *a, **k: handles.append(submit(*a, **k)) or handles[-1])
    body = {"model": "tiny-long", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server["url"] + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert got[0].startswith("data: {")
    # the server notices the closed connection and frees the row long before 3000 tokens are done
    deadline = time.time() + 10
    while engine.scheduler.is_busy("tiny-long") and time.time() < deadline:
        time.sleep(0.02)  # not busy: the result is set (it is set before the row is freed)
    assert not engine.scheduler.is_busy("tiny-long")
    assert handles[0].result.finish_reason == "cancelled"
    assert handles[0].result.completion_tokens < 3000


def test_cli_generate_cached_equals_no_cache(tmp_path, capsys, monkeypatch):
    from engine.__main__ import main

    monkeypatch.setenv("SCRATCHCHAT_DTYPE", "float32")
    torch.manual_seed(0)
    cfg = ModelConfig(**{**LLAMA.to_dict(), "context_length": 512})
    store.add_model("cli", cfg.to_dict(), GPT(cfg).state_dict(), prompt_format="alpaca", root=tmp_path,
                    tokenizer={"type": "none", "eos_token_ids": []})
    args = ["generate", "--model", "cli", "--prompt", "Name a color.", "--max-new-tokens", "12", "--temperature", "0",
            "--models-dir", str(tmp_path)]
    assert main(args) == 0
    cached = capsys.readouterr()
    assert main([*args, "--no-cache"]) == 0
    uncached = capsys.readouterr()
    assert cached.out == uncached.out and len(cached.out) > 1
    assert "12 new tokens" in cached.err and "no cache" in uncached.err
    assert main(["generate", "--model", "missing", "--prompt", "x", "--models-dir", str(tmp_path)]) == 1
    assert "no model" in capsys.readouterr().err


def test_seed_out_of_range_fails_alone(client):
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=1.0, seed=2**70)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "seed"
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3)
    assert r.usage.completion_tokens == 3
