"""Command line: ``python -m engine generate|serve|bench``.

* ``generate`` streams one answer to the terminal, rendered in the model's prompt format (``--raw`` sends the text
  as is); ``--no-cache`` recomputes the whole sequence per token (the book's loop, for comparison).
* ``serve`` runs the OpenAI-compatible API (:mod:`engine.api`) with uvicorn, on 127.0.0.1 unless told otherwise.
* ``bench`` runs :mod:`engine.bench`.

OpenMP's wait policy is left at libgomp's default (threads spin briefly between parallel regions, then sleep), as in
the chat app: a decode step is hundreds of small ops, and ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) was
measured to cost 40-45% of int8 and batched decode speed here. On a machine shared with other busy processes, set
``OMP_WAIT_POLICY=PASSIVE`` yourself: there, spinning threads of two processes slow each other down far more.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path


def _add_models_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models store (default: $CHAT_MODELS_DIR or ./models)")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from engine.errors import EngineError
    from engine.generate import TextStream, generate_uncached
    from engine.lora import BatchLora
    from engine.sessions import Engine

    engine = Engine(args.models_dir)
    try:
        lm = engine.load(args.model)
        cfg = engine.generation_defaults(args.model)
        over = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                  ("top_k", args.top_k), ("top_p", args.top_p), ("seed", args.seed)) if v is not None}
        cfg = replace(cfg, **over)
        if args.raw:
            ids, stops = lm.tokenizer.encode(args.prompt), ()
        else:
            fmt = engine.prompt_format(lm, args.adapter)  # an adapter may have been trained on another format
            system = args.system
            if system is None and fmt is lm.prompt_format:
                system = lm.manifest.get("system_prompt")
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": args.prompt}]
            ids, stops = fmt.encode_chat(msgs, lm.tokenizer), fmt.stop_strings
        t0 = time.perf_counter()
        if args.no_cache:
            ad = engine.adapter(lm, args.adapter)
            stream = TextStream(lm.tokenizer, tuple(stops) + cfg.stop, lm.tokenizer.eos_token_ids)
            n, t_first = 0, None
            with torch.inference_mode():
                for token in generate_uncached(lm.model, ids, cfg, stop_ids=lm.tokenizer.eos_token_ids,
                                               lora=BatchLora([ad]) if ad else None):
                    t_first = t_first or time.perf_counter()
                    n += 1
                    sys.stdout.write(stream.push(token))
                    sys.stdout.flush()
                    if stream.stopped:
                        break
            sys.stdout.write(stream.finish("length") + "\n")
            dt = time.perf_counter() - (t_first or t0)
            print(f"[{len(ids)} prompt + {n} new tokens, no cache, {max(n - 1, 0) / dt if dt else 0:.1f} tok/s]",
                  file=sys.stderr)
            return 0
        handle = engine.submit(args.model, ids, cfg, adapter=args.adapter, stop_strings=stops)
        for d in handle:
            sys.stdout.write(d.text)
            sys.stdout.flush()
            if d.usage is not None:
                u = d.usage
                print(file=sys.stdout)
                print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} new tokens, {u.finish_reason}; "
                      f"first token {1e3 * u.ttft_s:.0f} ms, {u.decode_tokens_per_s:.1f} tok/s, {lm.dtype}]",
                      file=sys.stderr)
        return 0
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        engine.close()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.api import build_app
    from engine.sessions import Engine

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger(__name__).warning("serving on %s without --api-key: anyone who can reach it can use it",
                                            args.host)
    app = build_app(Engine(args.models_dir), api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench parses its own options
        from engine import bench

        return bench.main(argv[1:])
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream one answer to the terminal", formatter_class=fmt)
    g.add_argument("--model", required=True, help="model name in the store")
    g.add_argument("--adapter", default=None, help="LoRA adapter of that model")
    g.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    g.add_argument("--system", default=None, help="system prompt (default: the model's)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation settings")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every token")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the prompt format")
    _add_models_dir(g)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API", formatter_class=fmt)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    _add_models_dir(s)

    sub.add_parser("bench", help="speed figures vs transformers (Markdown + JSON); see bench --help")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        try:
            return _generate(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return _serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
