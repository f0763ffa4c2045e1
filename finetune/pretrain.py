"""``python -m finetune pretrain``: the book's ch. 5 pretraining loop on a plain text file.

The text is split 90/10 by characters (the book's ``train_ratio``), cut into sliding windows of ``--max-length``
tokens every ``--stride`` tokens (``create_dataloader_v1``), and trained with next-token cross-entropy through the
shared loop (AdamW lr 4e-4, weight decay 0.1, 10 epochs, batch 2: the book's main-chapter settings). It starts
from a store model (``--model``, continued pretraining) or from a fresh random init of a preset (``--preset``,
e.g. gpt2-small with ``--config '{"context_length": 256, "qkv_bias": false}'``, the book's GPT_CONFIG_124M). After
each epoch the book's sample (greedy continuation of "Every effort moves you") is logged. The result is a new store
model with prompt format ``none``.

Usage:
    python -m finetune pretrain --data the-verdict.txt --preset gpt2-small --tokenizer-dir gpt2/ --out verdict-124m
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.args import TrainArgs, args_from_namespace, build_parser, validate_args
from finetune.data import SlidingWindowDataset, stack_collate
from finetune.distributed import setup_distributed, setup_logging, teardown_distributed
from finetune.runs import BaseModel, default_run_dir, early_exit_code, load_base
from finetune.train import TrainResult, train

log = logging.getLogger(__name__)


@dataclass
class PretrainArgs(TrainArgs):
    """Options of ``python -m finetune pretrain`` (defaults: the book's ch. 5 main-chapter run)."""

    format: str = field(default="none", metadata={"choices": ("alpaca", "phi3", "chatml", "none")})
    """Prompt format recorded for the new model (plain text: none)."""
    epochs: int = 10
    """Passes over the training text."""
    batch_size: int = 2
    """Global batch of one optimizer step."""
    lr: float = 4e-4
    """AdamW learning rate."""
    max_length: int | None = None
    """Window length in tokens (default: the model's context length)."""
    stride: int | None = None
    """Window step in tokens (default: --max-length, i.e. no overlap)."""
    train_ratio: float = 0.9
    """Fraction of the text's characters used for training; the rest is validation."""
    preset: str | None = None
    """Start from a random init of this ModelConfig preset instead of --model."""
    config: str | None = None
    """JSON object of ModelConfig overrides for --preset, e.g. '{"context_length": 256, "qkv_bias": false}'."""
    tokenizer_dir: str | None = None
    """Folder with encoder.json + vocab.bpe (GPT-2) or tokenizer.json, for --preset."""
    sample_prompt: str = "Every effort moves you"
    """Start of the sample generated after each epoch."""
    overwrite: bool = False
    """Replace an existing model named --out."""


def build_fresh(args: PretrainArgs) -> BaseModel:
    """A randomly initialised GPT of ``--preset`` (+ ``--config`` overrides) with the tokenizer of --tokenizer-dir."""
    from engine.config import ModelConfig
    from engine.model import GPT
    from engine.tokenizer import load_tokenizer
    from weights import store

    if not args.tokenizer_dir:
        raise ValueError("--preset needs --tokenizer-dir (a folder with encoder.json + vocab.bpe or tokenizer.json)")
    overrides = json.loads(args.config) if args.config else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"--config must be a JSON object of ModelConfig fields, got {args.config!r}")
    config = ModelConfig.from_name(args.preset, **overrides)
    folder = Path(args.tokenizer_dir)
    tok_entry, files = store.read_tokenizer_dir(folder, config.to_dict())
    torch.manual_seed(args.seed)
    model = GPT(config)
    tokenizer = load_tokenizer(folder, tok_entry)  # the entry's file names are those in the folder
    manifest = {"name": None, "config": config.to_dict(), "tokenizer": tok_entry, "dtype": "float32", "sha256": "",
                "generation": {}, "system_prompt": None, "_files": files}
    return BaseModel(name=f"{args.preset} (random init)", manifest=manifest, model=model, tokenizer=tokenizer,
                     model_dir=folder)


def run(args: PretrainArgs, *, on_step: Callable[[int, float], None] | None = None
        ) -> tuple[TrainResult, dict[str, Any] | None]:
    from weights import store

    validate_args(args)
    if not args.out:
        raise ValueError("--out NAME is required: the name of the new model in the store")
    if not args.data:
        raise ValueError("--data PATH is required: a plain text file (the book uses the-verdict.txt)")
    if bool(args.model) == bool(args.preset):
        raise ValueError("pass exactly one of --model (continue a store model) or --preset (random init)")
    store.check_name(args.out)
    if not args.overwrite and not args.resume and store.model_dir(args.out, args.models_dir).exists():
        raise FileExistsError(f"model {args.out!r} already exists; pick another --out or pass --overwrite")
    info = setup_distributed(args.device)
    try:
        setup_logging(info)
        base = load_base(args.model, args.models_dir) if args.model else build_fresh(args)
        text = Path(args.data).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{args.data} is empty; pretraining needs some text")
        split = int(args.train_ratio * len(text))
        context = base.model.config.context_length
        max_length = min(args.max_length or context, context)
        stride = args.stride or max_length
        train_set = SlidingWindowDataset(base.tokenizer.encode(text[:split]), max_length, stride)
        val_ids = base.tokenizer.encode(text[split:])
        val_set = SlidingWindowDataset(val_ids, max_length, stride) if len(val_ids) > max_length else []
        if info.is_main:
            log.info("pretraining %s on %s: %d train / %d val windows of %d tokens", base.name, args.data,
                     len(train_set), len(val_set), max_length)
        run_dir = default_run_dir(args, "pretrain")
        result = train(base.model, train_set, val_set, stack_collate, args, info=info, run_dir=run_dir,
                       sample_fn=_sample_fn(base, args), on_step=on_step)
        manifest = None
        if not result.interrupted and info.is_main:
            manifest = save_pretrained_model(args, base, result, run_dir)
        return result, manifest
    finally:
        teardown_distributed(info)


def _sample_fn(base: BaseModel, args: PretrainArgs) -> Callable[[nn.Module], str] | None:
    if not args.sample_tokens or not args.sample_prompt:
        return None

    def sample(model: nn.Module) -> str:
        from engine.generate import generate_tokens
        from engine.sampling import GenerationConfig

        ids = base.tokenizer.encode(args.sample_prompt)
        cfg = GenerationConfig(max_new_tokens=args.sample_tokens, temperature=0.0)
        out = list(generate_tokens(model, ids, cfg, stop_ids=base.tokenizer.eos_token_ids))
        return args.sample_prompt + base.tokenizer.decode(out)

    return sample


def save_pretrained_model(args: PretrainArgs, base: BaseModel, result: TrainResult, run_dir: Path) -> dict[str, Any]:
    from weights import store

    files: dict[str, Any] = dict(base.manifest.get("_files") or base.tokenizer_files())
    for extra in ("loss.png", "metrics.json"):
        if (run_dir / extra).is_file():
            files[extra] = run_dir / extra
    created_from = None
    if args.model:
        created_from = {"name": base.name, "sha256": base.sha256, "method": "pretrain"}
    hp = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed", "dtype", "grad_accum",
                                        "stride", "train_ratio", "preset", "config")}
    manifest = store.add_model(
        args.out, base.model.config.to_dict(), {k: v.detach() for k, v in base.model.state_dict().items()},
        tokenizer=base.manifest.get("tokenizer"), files=files, prompt_format=args.format,
        dtype=base.manifest.get("dtype", "float32"),
        source={"kind": "finetune-pretrain", "data": str(args.data), "hyperparameters": hp,
                "train_steps": result.steps,
                "final_val_loss": result.history["val"][-1][1] if result.history["val"] else None},
        created_from=created_from, root=args.models_dir, overwrite=args.overwrite,
    )
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PretrainArgs, "python -m finetune pretrain",
                          "The book's ch. 5 pretraining loop on a plain text file, into a new store model.",
                          skip=("mask_instructions",))
    args = args_from_namespace(PretrainArgs, parser.parse_args(argv))
    result, manifest = run(args)
    if (code := early_exit_code(result)) is not None:
        return code
    if manifest is not None:
        print(f"saved model {manifest['name']} ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
