"""finetune.evaluate: the seed's judge prompt and payload against fake Ollama / OpenAI servers, and the full command."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model import GPT
from finetune import evaluate
from weights import store

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "instruction-data.json"

ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
         "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."}


class FakeJudge:
    """A judge on 127.0.0.1 speaking Ollama's /api/chat (streamed JSON lines) and OpenAI's /v1/chat/completions."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, dict, dict]] = []
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, body, dict(self.headers)))
                reply = judge.replies.pop(0)
                if self.path == "/api/chat":  # Ollama streams one JSON object per line
                    half = len(reply) // 2
                    chunks = [{"message": {"role": "assistant", "content": reply[:half]}, "done": False},
                              {"message": {"role": "assistant", "content": reply[half:]}, "done": True}]
                    payload = "".join(json.dumps(c) + "\n" for c in chunks).encode()
                elif self.path == "/v1/chat/completions":
                    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                                "content": reply}}]}).encode()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_judge_prompt_is_the_seeds():
    assert evaluate.judge_prompt(ENTRY) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is "
        "very fast.` and correct output `The car is as fast as lightning.`, score the model response `The car is as "
        "fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number "
        "only."
    )


def test_ollama_protocol_and_payload():
    with FakeJudge(["85"]) as judge:
        reply = evaluate.query_model("hello", url=judge.url + "/api/chat", model="llama3")
    assert reply == "85"  # joined from two streamed lines
    path, body, headers = judge.requests[0]
    assert path == "/api/chat" and headers["Content-Type"] == "application/json"
    assert body == {"model": "llama3", "messages": [{"role": "user", "content": "hello"}],
                    "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/chat/completions"])
def test_openai_protocol_and_payload(suffix):
    with FakeJudge(["42"]) as judge:
        reply = evaluate.query_model("hello", url=judge.url + suffix, model="judge", api="openai", api_key="k")
    assert reply == "42"
    path, body, headers = judge.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge" and body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["seed"] == 123 and body["temperature"] == 0 and "max_tokens" not in body
    with FakeJudge(["7", "8"]) as judge:
        evaluate.query_model("hi", url=judge.url + "/v1", api="openai", max_tokens=4)
        evaluate.query_model("hi", url=judge.url + "/api/chat", max_tokens=4)
    assert judge.requests[0][1]["max_tokens"] == 4
    assert judge.requests[1][1]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 4}


def test_scores_count_and_skip_non_integers():
    entries = [dict(ENTRY) for _ in range(4)]
    with FakeJudge(["85", " 40\n", "Score: 95", "95"]) as judge:
        result = evaluate.generate_model_scores(
            entries, query=lambda p: evaluate.query_model(p, url=judge.url + "/api/chat"), progress=False)
    assert result.scores == [85, 40, 95] and result.skipped == [(2, "Score: 95")] and result.total == 4
    assert result.average == pytest.approx(220 / 3)
    assert "Number of scores: 3 of 4 (1 skipped)" in result.summary()
    assert judge.requests[0][1]["messages"][0]["content"] == evaluate.judge_prompt(ENTRY)


def test_unreachable_judge_is_a_clear_error():
    with pytest.raises(OSError, match="not reachable"):
        evaluate.query_model("x", url="http://127.0.0.1:1/api/chat", timeout=2)
    with FakeJudge(["1"]) as judge, pytest.raises(OSError):
        evaluate.query_model("x", url=judge.url + "/nothing/here", api="ollama", timeout=5)


def test_evaluate_command_end_to_end(tmp_path):
    config = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                         ffn_dim=64)
    torch.manual_seed(123)
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    store.add_model("tiny", config.to_dict(), GPT(config).state_dict(), tokenizer=tok, files=files,
                    prompt_format="alpaca", root=tmp_path)
    out = tmp_path / "instruction-data-with-response.json"
    with FakeJudge(["70", "n/a", "90"]) as judge:
        summary = evaluate.run(evaluate.EvaluateArgs(
            model="tiny", data=str(DATA), limit=3, max_new_tokens=6, output=str(out), judge_url=judge.url + "/v1",
            judge_api="auto", judge_model="m", models_dir=str(tmp_path), progress=False))
    saved = json.loads(out.read_text())
    test_split = json.loads(DATA.read_text())[935:938]
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in saved] == test_split
    assert all(isinstance(e["model_response"], str) for e in saved)
    assert summary["scored"] == 2 and summary["skipped"] == 1 and summary["average"] == 80.0
    assert judge.requests[0][0] == "/v1/chat/completions"
    # scoring a saved file needs no model
    with FakeJudge(["10", "20", "30"]) as judge:
        summary = evaluate.run(evaluate.EvaluateArgs(responses=str(out), judge_url=judge.url + "/api/chat",
                                                     progress=False))
    assert summary["average"] == 20.0 and "options" in judge.requests[0][1]


@pytest.mark.slow
def test_judge_against_engine_serve(tmp_path):
    """The real protocol: this project's own ``python -m engine serve`` as the (weak) OpenAI-compatible judge."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    config = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                         ffn_dim=64)
    torch.manual_seed(123)
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    store.add_model("judge", config.to_dict(), GPT(config).state_dict(), tokenizer=tok, files=files,
                    prompt_format="none", generation={"max_new_tokens": 4}, root=tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    log = open(tmp_path / "serve.log", "w")  # a file, so the server never blocks on a full pipe
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "--models-dir",
                             str(tmp_path)], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"engine serve did not start: {(tmp_path / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.3)
        reply = evaluate.query_model("Respond with 7.", url=url + "/v1", model="judge", timeout=60)
        assert isinstance(reply, str)
        entries = [dict(ENTRY), dict(ENTRY)]
        result = evaluate.generate_model_scores(
            entries, query=lambda p: evaluate.query_model(p, url=url + "/v1/chat/completions", model="judge",
                                                          timeout=60), progress=False)
        assert result.total == 2 and len(result.scores) + len(result.skipped) == 2  # a random judge: never a crash
        with pytest.raises(OSError):  # an unknown judge model is an HTTP error, reported with the URL
            evaluate.query_model("x", url=url + "/v1", model="no-such-model", timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
