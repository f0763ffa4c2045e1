"""Evaluation: answers to the test split through the engine, then scores from a judge model over HTTP.

The book's ch. 7.7-7.8: greedy responses (``max_new_tokens=256``) for every test entry, extracted with the prompt
format's ``extract_response`` (the seed's ``.replace("### Response:", "").strip()``), saved as
``instruction-data-with-response.json``; then each response is scored 0-100 by a judge with the seed's exact
prompt, replies that are not an integer are counted and skipped, and the average is reported. The judge is Ollama's
``/api/chat`` (the seed's payload: ``options = {"seed": 123, "temperature": 0, "num_ctx": 2048}``, streamed JSON
lines) or any OpenAI-compatible ``/v1/chat/completions`` (``seed`` 123, ``temperature`` 0), for example this
project's own ``python -m engine serve``.

Usage:
    python -m finetune evaluate --model NAME [--adapter A] [--judge-url http://localhost:11434/api/chat]
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_JUDGE_URL = "http://localhost:11434/api/chat"
JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
RESPONSES_FILE = "instruction-data-with-response.json"


# ------------------------------------------------------------------------------------------------ responses


def generate_response(model: nn.Module, tokenizer: Any, fmt: Any, entry: dict[str, str], *, max_new_tokens: int = 256,
                      lora: Any = None) -> str:
    """Greedy answer to one entry through the engine (prefill + KV-cached decode), extracted as the book does.

    The prompt is the format's generation prompt (Alpaca: ``format_input(entry) + "\\n\\n### Response:\\n"``), i.e.
    exactly the prefix the model was trained to continue; generation stops at an EOS id or a stop string.
    """
    from engine.generate import TextStream, generate_tokens
    from engine.sampling import GenerationConfig

    prompt_ids = fmt.encode_prompt(entry["instruction"], tokenizer, entry.get("input", ""), add_generation_prompt=True)
    context = model.config.context_length
    if len(prompt_ids) >= context:
        prompt_ids = prompt_ids[-(context - 1):]  # keep the end, where the answer opens
    cfg = GenerationConfig(max_new_tokens=min(max_new_tokens, context - len(prompt_ids)), temperature=0.0)
    eos = tuple(tokenizer.eos_token_ids)
    stream = TextStream(tokenizer, fmt.stop_strings, eos)
    for token in generate_tokens(model, prompt_ids, cfg, stop_ids=eos, lora=lora):
        stream.push(token)
        if stream.stopped:
            break
    stream.finish("length")
    return fmt.extract_response(stream.text)


def generate_responses(model: nn.Module, tokenizer: Any, fmt: Any, entries: Sequence[dict[str, str]], *,
                       max_new_tokens: int = 256, lora: Any = None, key: str = "model_response",
                       progress: bool = True) -> list[dict[str, Any]]:
    """Copies of ``entries`` with ``entry[key]`` = the model's answer (the book's ``test_data[i]["model_response"]``).
    """
    from tqdm.auto import tqdm

    model.eval()
    out = []
    torch.manual_seed(123)
    for entry in tqdm(entries, desc="responses", disable=not progress):
        out.append({**entry, key: generate_response(model, tokenizer, fmt, entry, max_new_tokens=max_new_tokens,
                                                    lora=lora)})
    return out


# ------------------------------------------------------------------------------------------------ judge


def format_input(entry: dict[str, str]) -> str:
    """The book's Alpaca ``format_input``, which the seed's judge prompt embeds whatever format was trained."""
    from engine.prompts import get_prompt_format

    return get_prompt_format("alpaca").format(entry["instruction"], entry.get("input", ""))


def judge_prompt(entry: dict[str, str], key: str = "model_response") -> str:
    """The seed's exact scoring prompt."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def detect_api(url: str) -> str:
    """``ollama`` for an ``/api/chat`` URL, else ``openai``."""
    return "ollama" if urllib.parse.urlparse(url).path.rstrip("/").endswith("/api/chat") else "openai"


def openai_chat_url(url: str) -> str:
    """Accept a server root, a ``/v1`` base or the full ``/v1/chat/completions`` URL."""
    path = urllib.parse.urlparse(url).path.rstrip("/")
    if path.endswith("/chat/completions"):
        return url
    if path.endswith("/v1"):
        return url.rstrip("/") + "/chat/completions"
    return url.rstrip("/") + "/v1/chat/completions"


def query_model(prompt: str, *, url: str = DEFAULT_JUDGE_URL, model: str = "llama3", api: str = "auto",
                timeout: float = 300.0, api_key: str | None = None, max_tokens: int | None = None) -> str:
    """Send one user message to the judge and return its reply text.

    Args:
        api: ``ollama`` (POST the seed's payload to ``/api/chat``, read the streamed JSON lines and join each
            ``message.content``), ``openai`` (POST to ``/v1/chat/completions``, read ``choices[0].message.content``)
            or ``auto`` (by the URL's path).
        api_key: sent as a Bearer token to OpenAI-compatible servers that need one.
        max_tokens: cap the reply (OpenAI ``max_tokens``, Ollama ``num_predict``); None sends the seed's payload.

    Raises:
        OSError: the server cannot be reached or answers with an HTTP error (message names the URL).
        ValueError: the reply is not the protocol's JSON.
    """
    api = detect_api(url) if api == "auto" else api
    messages = [{"role": "user", "content": prompt}]
    headers = {"Content-Type": "application/json"}
    if api == "ollama":
        payload: dict[str, Any] = {"model": model, "messages": messages, "options": dict(JUDGE_OPTIONS)}
        if max_tokens is not None:
            payload["options"]["num_predict"] = max_tokens
    elif api == "openai":
        url = openai_chat_url(url)
        payload = {"model": model, "messages": messages, "seed": JUDGE_OPTIONS["seed"],
                   "temperature": JUDGE_OPTIONS["temperature"], "stream": False}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
    else:
        raise ValueError(f"judge api must be auto, ollama or openai, got {api!r}")
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8")
    except OSError as exc:
        raise OSError(f"judge at {url} is not reachable: {exc}. Start it (ollama serve / python -m engine serve) "
                      f"or pass --judge-url") from exc
    try:
        if api == "ollama":
            return "".join(json.loads(line)["message"]["content"] for line in body.splitlines() if line.strip())
        return json.loads(body)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"judge at {url} sent a reply that is not {api} chat JSON: {body[:200]!r}") from exc


@dataclass
class JudgeResult:
    """Scores of the entries whose reply was an integer; ``skipped`` lists (index, reply) of the others."""

    scores: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    total: int = 0

    @property
    def average(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    def summary(self) -> str:
        avg = "n/a" if self.average is None else f"{self.average:.2f}"
        return f"Number of scores: {len(self.scores)} of {self.total} ({len(self.skipped)} skipped)\n" \
               f"Average score: {avg}"


def generate_model_scores(entries: Sequence[dict[str, Any]], key: str = "model_response", *,
                          query: Callable[[str], str], progress: bool = True) -> JudgeResult:
    """The seed's ``generate_model_scores``: ``int(reply)`` per entry; a reply that is not an integer is skipped."""
    from tqdm.auto import tqdm

    result = JudgeResult(total=len(entries))
    for i, entry in enumerate(tqdm(entries, desc="scoring", disable=not progress)):
        reply = query(judge_prompt(entry, key))
        try:
            result.scores.append(int(reply.strip()))
        except ValueError:
            log.warning("Could not convert score: %r (entry %d)", reply, i)
            result.skipped.append((i, reply))
    return result


# ------------------------------------------------------------------------------------------------ command


@dataclass
class EvaluateArgs:
    """Options of ``python -m finetune evaluate``."""

    model: str | None = None
    """Model name in the store."""
    adapter: str | None = None
    """LoRA adapter of that model (applied through the engine)."""
    data: str | None = None
    """Instruction data; the test split (the book's 10% after the first 85%) is evaluated (default: the book's
    instruction-data.json)."""
    format: str | None = None
    """Prompt format (default: the adapter's, else the model's manifest prompt_format)."""
    limit: int | None = None
    """Evaluate only the first N test entries."""
    max_new_tokens: int = 256
    """Longest generated answer."""
    output: str = RESPONSES_FILE
    """Where to save the entries with their model_response."""
    responses: str | None = None
    """Score this saved responses file instead of generating (no --model needed)."""
    judge_url: str | None = None
    """Judge endpoint: Ollama http://localhost:11434/api/chat or an OpenAI-compatible /v1/chat/completions
    (default: no scoring)."""
    judge_model: str = "llama3"
    """Model name sent to the judge."""
    judge_api: str = "auto"
    """auto (by URL), ollama or openai."""
    judge_max_tokens: int | None = None
    """Cap the judge's reply in tokens (a weak local judge may ramble; an integer needs few)."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding a Bearer token for OpenAI-compatible judges (used only when set)."""
    models_dir: str | None = None
    """Model store root (default: $CHAT_MODELS_DIR or ./models)."""
    progress: bool = True
    """Show tqdm progress bars."""


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4)
    os.replace(tmp, path)


def load_for_inference(name: str, adapter: str | None, root: str | None) -> tuple[nn.Module, Any, Any, str]:
    """(model in eval mode, tokenizer, LoRA hook or None, prompt format name) from the store."""
    from engine.lora import BatchLora, load_adapter
    from finetune.train import load_base
    from weights import store

    base = load_base(name, root)
    model = base.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fmt_name = base.manifest.get("prompt_format") or "none"
    hook = None
    if adapter:
        path = store.adapter_dir(name, adapter, root)
        lora = load_adapter(path, model.config, name=adapter, base_name=name, base_sha256=base.sha256 or None)
        hook = BatchLora([lora])
        fmt_name = lora.meta.get("prompt_format") or fmt_name
    return model, base.tokenizer, hook, fmt_name


def run(args: EvaluateArgs) -> dict[str, Any]:
    """Generate (or read) responses, then score them if a judge is given; returns a summary dict."""
    from engine.prompts import get_prompt_format
    from finetune.data import load_instruction_data, split_data

    summary: dict[str, Any] = {}
    if args.responses:
        with open(args.responses, encoding="utf-8") as f:
            entries = json.load(f)
        if args.limit is not None:
            entries = entries[:args.limit]
    else:
        if not args.model:
            raise ValueError("--model is required (or --responses FILE to score saved responses)")
        _, test, _ = split_data(load_instruction_data(args.data))
        if args.limit is not None:
            test = test[:args.limit]
        model, tokenizer, hook, fmt_name = load_for_inference(args.model, args.adapter, args.models_dir)
        fmt = get_prompt_format(args.format or fmt_name)
        start = time.perf_counter()
        entries = generate_responses(model, tokenizer, fmt, test, max_new_tokens=args.max_new_tokens, lora=hook,
                                     progress=args.progress)
        summary["generation_s"] = time.perf_counter() - start
        _write_json_atomic(Path(args.output), entries)
        summary["responses_file"] = str(Path(args.output).resolve())
    summary["entries"] = len(entries)
    if args.judge_url:
        api_key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None

        def query(prompt: str) -> str:
            return query_model(prompt, url=args.judge_url, model=args.judge_model, api=args.judge_api,
                               api_key=api_key, max_tokens=args.judge_max_tokens)

        result = generate_model_scores(entries, query=query, progress=args.progress)
        summary.update(scored=len(result.scores), total=result.total, skipped=len(result.skipped),
                       average=result.average, summary=result.summary())
    return summary


def main(argv: list[str] | None = None) -> int:
    from finetune.train import args_from_namespace, build_parser

    parser = build_parser(EvaluateArgs, "python -m finetune evaluate",
                          "Answer the test split through the engine and score the answers with a judge model.")
    args = args_from_namespace(EvaluateArgs, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(args)
    if "responses_file" in summary:
        print(f"saved {summary['entries']} responses to {summary['responses_file']} "
              f"({summary['generation_s']:.1f} s)")
    if "summary" in summary:
        print(summary["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
