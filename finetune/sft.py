"""``python -m finetune sft``: full instruction finetuning (the book's ch. 7) into a new model in the store.

Every parameter is trained with the shared loop (:mod:`finetune.train`). The result is written atomically with
:func:`weights.store.add_model`: same config and tokenizer as the base, the prompt format it was trained with, and
``created_from = {"name", "sha256", "method": "sft", "hyperparameters", ...}`` in model.json; the loss plot and
metrics.json sit in the new model's folder. The app lists it on its next store read, without a restart.

Usage:
    python -m finetune sft --model gpt2-medium --data instruction-data.json --format alpaca --out gpt2-medium-sft
    torchrun --nproc_per_node 2 -m finetune sft ...   # DDP, same losses as one process with the same --batch-size
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.args import TrainArgs, args_from_namespace, build_parser, validate_args
from finetune.distributed import setup_distributed, setup_logging, teardown_distributed
from finetune.runs import build_sample_fn, default_run_dir, early_exit_code, prepare_instruction_run
from finetune.train import TrainResult, train

log = logging.getLogger(__name__)

HYPERPARAMETER_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "max_length", "grad_accum", "mask_instructions",
                       "seed", "dtype", "limit")


@dataclass
class SFTArgs(TrainArgs):
    """Options of ``python -m finetune sft``."""

    save_dtype: str | None = None
    """float32 or bfloat16 on disk (default: the base's)."""
    overwrite: bool = False
    """Replace an existing model named --out."""


def hyperparameters(args: TrainArgs, **extra: Any) -> dict[str, Any]:
    hp = {k: getattr(args, k) for k in HYPERPARAMETER_KEYS}
    hp["format"] = args.format
    hp["data"] = args.data or "instruction-data.json (book)"
    return {**hp, **extra}


def run(args: SFTArgs, *, on_step: Callable[[int, float], None] | None = None
        ) -> tuple[TrainResult, dict[str, Any] | None]:
    """Train and save; returns the result and the new manifest (None when interrupted or on ranks > 0)."""
    from weights import store

    validate_args(args)
    if not args.out:
        raise ValueError("--out NAME is required: the name of the new model in the store")
    store.check_name(args.out)
    if not args.overwrite and not args.resume and store.model_dir(args.out, args.models_dir).exists():
        raise FileExistsError(f"model {args.out!r} already exists; pick another --out or pass --overwrite")
    info = setup_distributed(args.device)
    try:
        setup_logging(info)
        run_ = prepare_instruction_run(args)
        base = run_.base
        run_dir = default_run_dir(args, "sft")
        if info.is_main:
            log.info("full SFT of %s: %d train / %d val examples (%d skipped as longer than %d tokens)",
                     base.name, len(run_.train_set), len(run_.val_set), run_.skipped["train"], run_.max_length)
        result = train(base.model, run_.train_set, run_.val_set, run_.collate, args, info=info, run_dir=run_dir,
                       sample_fn=build_sample_fn(run_, args.sample_tokens), on_step=on_step)
        manifest = None
        if not result.interrupted and info.is_main:
            manifest = save_model(args, base, result, run_dir, skipped=run_.skipped)
        return result, manifest
    finally:
        teardown_distributed(info)


def save_model(args: SFTArgs, base: Any, result: TrainResult, run_dir: Path, *, skipped: dict[str, int]
               ) -> dict[str, Any]:
    """Write the finetuned weights as a new store model (atomic), with loss plot + metrics next to them."""
    import shutil

    from weights import store

    model = base.model
    state = {k: v.detach() for k, v in model.state_dict().items()}
    files: dict[str, Path] = dict(base.tokenizer_files())
    for extra in ("loss.png", "metrics.json"):
        if (run_dir / extra).is_file():
            files[extra] = run_dir / extra
    hp = hyperparameters(args, skipped=skipped)
    created_from = {
        "name": base.name,
        "sha256": base.sha256,
        "method": "sft",
        "hyperparameters": hp,
        "train_steps": result.steps,
        "final_train_loss": result.history["train_loss"][-1] if result.history["train_loss"] else None,
        "final_val_loss": result.history["val"][-1][1] if result.history["val"] else None,
    }
    manifest = store.add_model(
        args.out, base.manifest["config"], state, tokenizer=base.manifest.get("tokenizer"), files=files,
        prompt_format=args.format, dtype=args.save_dtype or base.manifest.get("dtype", "float32"),
        source={"kind": "finetune-sft", "base": base.name}, created_from=created_from,
        generation=base.manifest.get("generation") or {}, system_prompt=base.manifest.get("system_prompt"),
        root=args.models_dir, overwrite=args.overwrite,
    )
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the model is saved; nothing left to resume
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(SFTArgs, "python -m finetune sft",
                          "Full instruction finetuning of a store model into a new store model.")
    args = args_from_namespace(SFTArgs, parser.parse_args(argv))
    result, manifest = run(args)
    if (code := early_exit_code(result)) is not None:
        return code
    if manifest is not None:
        print(f"saved model {manifest['name']} ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
              f"{result.wall_time_s:.1f} s); metrics in {result.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
