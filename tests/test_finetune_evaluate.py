"""finetune.evaluate / judge: batched answers equal one-at-a-time ones, the seed's judge prompt and payload against fake
Ollama / OpenAI servers, both judge parse rules, and the full command."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model import GPT
from finetune import evaluate, judge
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
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body, dict(self.headers)))
                reply = fake.replies.pop(0)
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
    assert judge.judge_prompt(ENTRY) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is "
        "very fast.` and correct output `The car is as fast as lightning.`, score the model response `The car is as "
        "fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number "
        "only."
    )


def test_ollama_protocol_and_payload():
    with FakeJudge(["85"]) as server:
        reply = judge.query_model("hello", url=server.url + "/api/chat", model="llama3")
    assert reply == "85"  # joined from two streamed lines
    path, body, headers = server.requests[0]
    assert path == "/api/chat" and headers["Content-Type"] == "application/json"
    assert body == {"model": "llama3", "messages": [{"role": "user", "content": "hello"}],
                    "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/chat/completions"])
def test_openai_protocol_and_payload(suffix):
    with FakeJudge(["42"]) as server:
        reply = judge.query_model("hello", url=server.url + suffix, model="judge", api="openai", api_key="k")
    assert reply == "42"
    path, body, headers = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge" and body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["seed"] == 123 and body["temperature"] == 0 and "max_tokens" not in body
    with FakeJudge(["7", "8"]) as server:
        judge.query_model("hi", url=server.url + "/v1", api="openai", max_tokens=4)
        judge.query_model("hi", url=server.url + "/api/chat", max_tokens=4)
    assert server.requests[0][1]["max_tokens"] == 4
    assert server.requests[1][1]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 4}


def test_scores_count_and_skip_non_integers():
    entries = [dict(ENTRY) for _ in range(4)]
    with FakeJudge(["85", " 40\n", "Score: 95", "95"]) as server:
        result = judge.generate_model_scores(
            entries, query=lambda p: judge.query_model(p, url=server.url + "/api/chat"), progress=False)
    assert result.scores == [85, 40, 95] and result.skipped == [(2, "Score: 95")] and result.total == 4
    assert result.average == pytest.approx(220 / 3)
    assert "Number of scores: 3 of 4 (1 skipped)" in result.summary()
    assert result.rule == "int" and "Parse rule: int" in result.summary()
    assert server.requests[0][1]["messages"][0]["content"] == judge.judge_prompt(ENTRY)


@pytest.mark.parametrize(("reply", "as_int", "first_int"), [
    ("85", 85, 85),
    (" 40\n", 40, 40),
    ("150", 150, None),  # the seed's int() takes any integer; first-int only 0..100
    ("-3", -3, None),
    ("Score: 85/100", None, 85),
    ("85.", None, 85),
    ("I would give it 4.5, so 60.", None, 60),  # a decimal is not an integer
    ("The 1st answer is fine: 70%", None, 70),  # "1st" is a word, not a number
    ("Rating (0-100): 92", None, 0),  # the first integer in range wins, even from the scale's wording
    ("n/a", None, None),
    ("", None, None),
])
def test_parse_rules(reply, as_int, first_int):
    assert judge.parse_score(reply, "int") == as_int
    assert judge.parse_score(reply, "first-int") == first_int


def test_unknown_parse_rule_is_refused():
    with pytest.raises(ValueError, match="first-int"):
        judge.parse_score("1", "last-int")
    with pytest.raises(ValueError, match="parse rule"):
        judge.generate_model_scores([ENTRY], query=lambda p: "1", rule="nope", progress=False)


def test_first_int_rule_counts_replies_without_an_integer():
    replies = iter(["Score: 85/100", "I cannot judge this.", "70", "Rating: 4.5 of 5.0"])
    result = judge.generate_model_scores([dict(ENTRY) for _ in range(4)], query=lambda p: next(replies),
                                         rule="first-int", progress=False)
    assert result.scores == [85, 70] and [i for i, _ in result.skipped] == [1, 3] and result.total == 4
    assert result.rule == "first-int" and len(result.replies) == 4 and result.average == 77.5
    text = result.summary()
    assert "Parse rule: first-int" in text and "Number of scores: 2 of 4 (2 skipped)" in text
    assert "Average score: 77.50" in text


def test_unreachable_judge_is_a_clear_error():
    with pytest.raises(OSError, match="not reachable"):
        judge.query_model("x", url="http://127.0.0.1:1/api/chat", timeout=2)
    with FakeJudge(["1"]) as server, pytest.raises(OSError):
        judge.query_model("x", url=server.url + "/nothing/here", api="ollama", timeout=5)


def test_evaluate_command_end_to_end(tmp_path):
    config = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                         ffn_dim=64)
    torch.manual_seed(123)
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    store.add_model("tiny", config.to_dict(), GPT(config).state_dict(), tokenizer=tok, files=files,
                    prompt_format="alpaca", root=tmp_path)
    out = tmp_path / "instruction-data-with-response.json"
    with FakeJudge(["70", "n/a", "90"]) as server:
        summary = evaluate.run(evaluate.EvaluateArgs(
            model="tiny", data=str(DATA), limit=3, max_new_tokens=6, output=str(out), judge_url=server.url + "/v1",
            judge_api="auto", judge_model="m", models_dir=str(tmp_path), progress=False))
    saved = json.loads(out.read_text())
    test_split = json.loads(DATA.read_text())[935:938]
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in saved] == test_split
    assert all(isinstance(e["model_response"], str) for e in saved)
    assert summary["scored"] == 2 and summary["skipped"] == 1 and summary["average"] == 80.0
    assert server.requests[0][0] == "/v1/chat/completions"
    assert summary["parse_rule"] == "int" and "Parse rule: int" in summary["summary"]
    # scoring a saved file needs no model; the opt-in rule reads numbers wrapped in words
    with FakeJudge(["10", "Score: 20/100", "about thirty"]) as server:
        summary = evaluate.run(evaluate.EvaluateArgs(responses=str(out), judge_url=server.url + "/api/chat",
                                                     judge_parse="first-int", judge_output=str(tmp_path / "j.json"),
                                                     progress=False))
    assert "options" in server.requests[0][1]
    assert summary["parse_rule"] == "first-int" and summary["scored"] == 2 and summary["skipped"] == 1
    assert summary["average"] == 15.0 and "Parse rule: first-int" in summary["summary"]
    saved = json.loads((tmp_path / "j.json").read_text())
    assert [(r["reply"], r["score"]) for r in saved["replies"]] == [("10", 10), ("Score: 20/100", 20),
                                                                    ("about thirty", None)]


TINY_LLAMA = ModelConfig(vocab_size=50257, context_length=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=64, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory) -> Path:
    """A models root with "tiny-llama" (random, GPT-2 tokenizer) and a random rank-4 PEFT adapter "rand" for it."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("eval_store")
    tok, files = store.gpt2_tokenizer_entry(SHARED / "data" / "gpt2" / "encoder.json",
                                            SHARED / "data" / "gpt2" / "vocab.bpe")
    torch.manual_seed(123)
    model = GPT(TINY_LLAMA)
    with torch.no_grad():  # at the usual std 0.02 a random model says the same word to every prompt; at 0.2 the
        for p in model.parameters():  # answers depend on the prompt, so a wrong position or mask would show
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    manifest = store.add_model("tiny-llama", TINY_LLAMA.to_dict(), model.state_dict(), tokenizer=tok, files=files,
                               prompt_format="alpaca", root=root)
    torch.manual_seed(7)  # init_lora_weights=False: B is random too, so the adapter changes the answers
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], init_lora_weights=False)
    folder = store.adapter_dir("tiny-llama", "rand", root)
    peft.get_peft_model(model, cfg).save_pretrained(str(folder))
    (folder / "scratchchat.json").write_text(json.dumps({"base": "tiny-llama", "base_sha256": manifest["sha256"],
                                                         "prompt_format": "alpaca"}))
    return root


@pytest.mark.parametrize("adapter", [None, "rand"])
def test_batched_responses_equal_sequential(llama_store, adapter):
    """Greedy answers decoded 3 or 8 at a time by the scheduler (rows of different prompt lengths, refilled as rows
    finish) are exactly the one-at-a-time answers of generate_response, with and without an adapter."""
    from engine.lora import BatchLora
    from engine.prompts import get_prompt_format
    from finetune.data import load_instruction_data, split_data

    _, test, _ = split_data(load_instruction_data(str(DATA)))
    entries = test[:7]
    lm, lora, fmt_name = evaluate.load_for_inference("tiny-llama", adapter, str(llama_store))
    assert fmt_name == "alpaca" and (lora is None) == (adapter is None)
    fmt = get_prompt_format(fmt_name)
    hook = None if lora is None else BatchLora([lora])
    lengths = {len(fmt.encode_prompt(e["instruction"], lm.tokenizer, e["input"], add_generation_prompt=True))
               for e in entries}
    assert len(lengths) > 3  # the rows really hold different lengths
    sequential = [evaluate.generate_response(lm.model, lm.tokenizer, fmt, e, max_new_tokens=10, lora=hook)
                  for e in entries]
    assert len(set(sequential)) > 1 and all(sequential)
    for batch_size in (1, 3, 8):
        batched, tokens = evaluate.generate_responses(lm, fmt, entries, adapter=lora, max_new_tokens=10,
                                                      batch_size=batch_size, progress=False)
        assert [e["model_response"] for e in batched] == sequential, batch_size
        assert [{k: e[k] for k in ("instruction", "input", "output")} for e in batched] == entries
        assert 0 < tokens <= 10 * len(entries)
    if adapter is not None:  # the adapter is really applied
        plain = [evaluate.generate_response(lm.model, lm.tokenizer, fmt, e, max_new_tokens=10) for e in entries]
        assert plain != sequential


def test_batch_size_option(llama_store, tmp_path):
    with pytest.raises(ValueError, match="--batch-size"):
        evaluate.run(evaluate.EvaluateArgs(model="tiny-llama", batch_size=0, models_dir=str(llama_store)))
    args = evaluate.EvaluateArgs()
    assert args.batch_size == 8 and args.judge_parse == "int"


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
        reply = judge.query_model("Respond with 7.", url=url + "/v1", model="judge", timeout=60)
        assert isinstance(reply, str)
        entries = [dict(ENTRY), dict(ENTRY)]
        result = judge.generate_model_scores(
            entries, query=lambda p: judge.query_model(p, url=url + "/v1/chat/completions", model="judge",
                                                          timeout=60), progress=False)
        assert result.total == 2 and len(result.scores) + len(result.skipped) == 2  # a random judge: never a crash
        with pytest.raises(OSError):  # an unknown judge model is an HTTP error, reported with the URL
            judge.query_model("x", url=url + "/v1", model="no-such-model", timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
