"""``python -m weights``: list, fetch, import and export models in the store.

    python -m weights list
    python -m weights fetch gpt2-small|gpt2-medium|gpt2-large|gpt2-xl|smollm2-135m-instruct
    python -m weights import PATH --name NAME [--prompt-format F] [--dtype float32|bfloat16] [--tokenizer-dir DIR]
    python -m weights export NAME --to hf --out DIR

Errors print one line to stderr (what is wrong with which file, and the fix) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weights import store

EXIT_ERROR = 2


def _format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _cmd_list(args: argparse.Namespace) -> int:
    models = store.list_models(args.models_dir)
    if not models:
        print(f"no models in {store._root(args.models_dir)}; try `python -m weights fetch smollm2-135m-instruct`")
        return 0
    rows = [("NAME", "FAMILY", "PARAMS", "DTYPE", "FORMAT", "ADAPTERS")]
    for m in models:
        adapters = [a["name"] for a in store.list_adapters(m["name"], args.models_dir)]
        rows.append((m["name"], m.get("family", "?"), _format_count(int(m.get("num_parameters", 0))),
                     m.get("dtype", "?"), m.get("prompt_format", "?"), ",".join(adapters) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from weights import fetch

    present = store.model_dir(args.name, args.models_dir).exists() and not args.force
    manifest = fetch.fetch(args.name, root=args.models_dir, overwrite=args.force)
    print(f"{manifest['name']}: {manifest['family']}, {_format_count(manifest['num_parameters'])} parameters, "
          f"prompt format {manifest['prompt_format']}, "
          f"{'already ' if present else ''}in {store.model_dir(manifest['name'], args.models_dir)}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    manifest = store.import_path(args.path, args.name, prompt_format=args.prompt_format, root=args.models_dir,
                                 dtype=args.dtype, tokenizer_dir=args.tokenizer_dir, overwrite=args.force)
    print(f"imported {args.path} as {manifest['name']} ({manifest['family']}, "
          f"{_format_count(manifest['num_parameters'])} parameters, {manifest['dtype']}, "
          f"prompt format {manifest['prompt_format']})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from weights import hf

    manifest, state = store.read(args.name, args.models_dir)
    out = hf.write(args.out, manifest, state, store.model_dir(args.name, args.models_dir), overwrite=args.force)
    print(f"exported {args.name} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m weights", description="Manage the ScratchChat model store.",
                                     formatter_class=fmt)
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="the store (default: $CHAT_MODELS_DIR or <repo>/models)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list models: name, family, parameters, dtype, prompt format, adapters",
                   formatter_class=fmt).set_defaults(func=_cmd_list)
    p = sub.add_parser("fetch", help="download (or unpack offline) a known model and import it", formatter_class=fmt)
    p.add_argument("name", help="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl or smollm2-135m-instruct")
    p.add_argument("--force", action="store_true", help="replace a model of the same name")
    p.set_defaults(func=_cmd_fetch)
    p = sub.add_parser("import", help="import an OpenAI TF folder, HF safetensors or a GGUF file",
                       formatter_class=fmt)
    p.add_argument("path", type=Path)
    p.add_argument("--name", required=True, help="name of the model in the store")
    p.add_argument("--prompt-format", choices=store.PROMPT_FORMATS, default=None,
                   help="chat prompt format (default: the checkpoint's chat template if ChatML, else none)")
    p.add_argument("--dtype", choices=tuple(store.DTYPES), default="float32", help="dtype on disk")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="folder with encoder.json + vocab.bpe or tokenizer.json, if the checkpoint has none")
    p.add_argument("--force", action="store_true", help="replace a model of the same name")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser("export", help="export a model as an HF folder", formatter_class=fmt)
    p.add_argument("name")
    p.add_argument("--to", choices=("hf",), default="hf")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, ImportError) as e:  # OSError covers FileNotFound, FileExists, network
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, KeyError):
            message = f"missing key {message} in a model file; re-import the model"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
