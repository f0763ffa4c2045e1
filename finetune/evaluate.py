"""Evaluation: answers to the test split through the engine, then scores from a judge model over HTTP.

The book's ch. 7.7-7.8: greedy responses (``max_new_tokens=256``) for every test entry, extracted with the prompt
format's ``extract_response`` (the seed's ``.replace("### Response:", "").strip()``), saved as
``instruction-data-with-response.json``; then :mod:`finetune.judge` scores each one 0-100 and reports the average.
The answers are decoded ``--batch-size`` at a time by the engine's continuous-batching
:class:`~engine.scheduler.Scheduler` (rows of different prompt lengths share each decode step; a finished row is
refilled with the next entry), on a float32 base loaded by :class:`~engine.registry.Registry` with the adapter applied
per row; greedy decoding makes the answers the same as one entry at a time (:func:`generate_response`, which the
training loop also uses for its after-epoch sample).

Usage:
    python -m finetune evaluate --model NAME [--adapter A] [--judge-url http://localhost:11434/api/chat]
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.judge import PARSE_RULES, generate_model_scores, query_model

log = logging.getLogger(__name__)

RESPONSES_FILE = "instruction-data-with-response.json"


# ------------------------------------------------------------------------------------------------ responses


def _prompt_and_config(tokenizer: Any, fmt: Any, entry: dict[str, str], context: int, max_new_tokens: int
                       ) -> tuple[list[int], Any]:
    """The prompt ids of ``entry`` (cut to fit the context) and its greedy generation settings."""
    from engine.sampling import GenerationConfig

    prompt_ids = fmt.encode_prompt(entry["instruction"], tokenizer, entry.get("input", ""), add_generation_prompt=True)
    if len(prompt_ids) >= context:
        prompt_ids = prompt_ids[-(context - 1):]  # keep the end, where the answer opens
    cfg = GenerationConfig(max_new_tokens=min(max_new_tokens, context - len(prompt_ids)), temperature=0.0)
    return list(prompt_ids), cfg


def generate_response(model: nn.Module, tokenizer: Any, fmt: Any, entry: dict[str, str], *, max_new_tokens: int = 256,
                      lora: Any = None) -> str:
    """Greedy answer to one entry through the engine (prefill + KV-cached decode), extracted as the book does.

    The prompt is the format's generation prompt (Alpaca: ``format_input(entry) + "\\n\\n### Response:\\n"``), i.e.
    exactly the prefix the model was trained to continue; generation stops at an EOS id or a stop string.
    """
    from engine.generate import TextStream, generate_tokens

    prompt_ids, cfg = _prompt_and_config(tokenizer, fmt, entry, model.config.context_length, max_new_tokens)
    eos = tuple(tokenizer.eos_token_ids)
    stream = TextStream(tokenizer, fmt.stop_strings, eos)
    for token in generate_tokens(model, prompt_ids, cfg, stop_ids=eos, lora=lora):
        stream.push(token)
        if stream.stopped:
            break
    stream.finish("length")
    return fmt.extract_response(stream.text)


def generate_responses(lm: Any, fmt: Any, entries: Sequence[dict[str, str]], *, adapter: Any = None,
                       max_new_tokens: int = 256, batch_size: int = 8, key: str = "model_response",
                       progress: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Copies of ``entries`` with ``entry[key]`` = the model's greedy answer (the book's
    ``test_data[i]["model_response"]``), decoded ``batch_size`` entries at a time.

    Args:
        lm: the base, an :class:`engine.registry.LoadedModel`.
        fmt: the prompt format the answers are asked in (and extracted with).
        adapter: an :class:`engine.lora.LoraAdapter` applied to every entry, or None.
        batch_size: entries decoded together by the engine's scheduler.

    Returns:
        The entries with their answers, and the number of tokens generated.
    """
    from tqdm.auto import tqdm

    from engine.requests import Request
    from engine.scheduler import Scheduler

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not entries:
        return [], 0
    context = lm.config.context_length
    prompts = [_prompt_and_config(lm.tokenizer, fmt, e, context, max_new_tokens) for e in entries]
    # Rows as long as the longest prompt plus the longest answer, not the model's full context.
    needed = min(context, max(len(ids) + cfg.max_new_tokens for ids, cfg in prompts))
    scheduler = Scheduler(max_batch=batch_size, max_queue=len(entries), max_context=needed)
    eos = tuple(lm.tokenizer.eos_token_ids)
    handles = []
    try:
        torch.manual_seed(123)
        for ids, cfg in prompts:
            handles.append(scheduler.submit(Request(lm=lm, adapter=adapter, prompt_ids=ids, cfg=cfg, stop_ids=eos,
                                                    stop_strings=tuple(fmt.stop_strings))))
        out, tokens = [], 0
        for entry, handle in zip(entries, tqdm(handles, desc="responses", disable=not progress)):
            for _ in handle:  # deltas; the handle raises if the request failed
                pass
            out.append({**entry, key: fmt.extract_response(handle.result.text)})
            tokens += handle.result.completion_tokens
        return out, tokens
    finally:
        for handle in handles:
            handle.cancel()  # no-op for finished requests; frees the rows after an interruption
        scheduler.close()


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
    batch_size: int = 8
    """Test entries answered together in one batched decode (greedy: the same answers as one at a time)."""
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
    judge_parse: str = field(default="int", metadata={"choices": tuple(PARSE_RULES)})
    """How a reply becomes a score: int (the seed's int(reply); anything else is skipped) or first-int (the first
    integer 0..100 in the reply, for weak judges that answer "Score: 85/100")."""
    judge_output: str | None = None
    """Also save each entry's judge reply and parsed score to this JSON file."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding a Bearer token for OpenAI-compatible judges (used only when set)."""
    models_dir: str | None = None
    """Model store root (default: $CHAT_MODELS_DIR or ./models)."""
    progress: bool = True
    """Show tqdm progress bars."""


def load_for_inference(name: str, adapter: str | None, root: str | None) -> tuple[Any, Any, str]:
    """(the base as an :class:`engine.registry.LoadedModel` in float32, the adapter or None, the prompt format name:
    the adapter's, else the base manifest's) from the store."""
    from engine.registry import Registry

    registry = Registry(root, dtype=torch.float32)
    lm = registry.get(name)
    fmt_name = lm.manifest.get("prompt_format") or "none"
    lora = None
    if adapter:
        lora = registry.get_adapter(lm, adapter)
        fmt_name = lora.meta.get("prompt_format") or fmt_name
    return lm, lora, fmt_name


def run(args: EvaluateArgs) -> dict[str, Any]:
    """Generate (or read) responses, then score them if a judge is given; returns a summary dict."""
    from engine.prompts import get_prompt_format
    from finetune.checkpoint import write_json_atomic
    from finetune.data import load_instruction_data, split_data

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.judge_parse not in PARSE_RULES:
        raise ValueError(f"--judge-parse must be one of {sorted(PARSE_RULES)}, got {args.judge_parse!r}")
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
        lm, adapter, fmt_name = load_for_inference(args.model, args.adapter, args.models_dir)
        fmt = get_prompt_format(args.format or fmt_name)
        start = time.perf_counter()
        entries, tokens = generate_responses(lm, fmt, test, adapter=adapter, max_new_tokens=args.max_new_tokens,
                                             batch_size=args.batch_size, progress=args.progress)
        summary.update(generation_s=time.perf_counter() - start, generated_tokens=tokens, format=fmt.name)
        write_json_atomic(Path(args.output), entries, indent=4)  # the book saves with indent=4
        summary["responses_file"] = str(Path(args.output).resolve())
    summary["entries"] = len(entries)
    if args.judge_url:
        api_key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None

        def query(prompt: str) -> str:
            return query_model(prompt, url=args.judge_url, model=args.judge_model, api=args.judge_api,
                               api_key=api_key, max_tokens=args.judge_max_tokens)

        start = time.perf_counter()
        result = generate_model_scores(entries, query=query, rule=args.judge_parse, progress=args.progress)
        summary.update(scoring_s=time.perf_counter() - start, parse_rule=result.rule, scored=len(result.scores),
                       total=result.total, skipped=len(result.skipped), average=result.average,
                       summary=result.summary())
        if args.judge_output:
            scores = iter(result.scores)
            skipped = {i for i, _ in result.skipped}
            write_json_atomic(Path(args.judge_output), {
                "parse_rule": result.rule, "judge_model": args.judge_model, "scored": len(result.scores),
                "total": result.total, "skipped": len(result.skipped), "average": result.average,
                "replies": [{"index": i, "reply": r, "score": None if i in skipped else next(scores)}
                            for i, r in enumerate(result.replies)]})
    return summary


def main(argv: list[str] | None = None) -> int:
    from finetune.args import args_from_namespace, build_parser

    parser = build_parser(EvaluateArgs, "python -m finetune evaluate",
                          "Answer the test split through the engine and score the answers with a judge model.")
    args = args_from_namespace(EvaluateArgs, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(args)
    if "responses_file" in summary:
        s = summary["generation_s"]
        print(f"saved {summary['entries']} responses to {summary['responses_file']} ({s:.1f} s, "
              f"{summary['generated_tokens']} tokens, {summary['generated_tokens'] / max(s, 1e-9):.1f} tokens/s, "
              f"batch {args.batch_size})")
    if "summary" in summary:
        print(summary["summary"])
        print(f"judge time: {summary['scoring_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
