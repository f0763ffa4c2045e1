"""Setting up a training run: loading a store model as a trainable float32 GPT (:func:`load_base`), the instruction
data split the book's way into datasets with the right end-of-text id and collate (:func:`prepare_instruction_run`),
the after-epoch sample answer generated through the engine (:func:`build_sample_fn`), the default run directory
under the cache, and the exit code a command returns for interrupted runs and non-zero DDP ranks. ``sft`` and
``lora`` use all of it, ``pretrain`` the parts that do not depend on instruction data, and ``evaluate`` loads its
model with :func:`load_base`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.data import cache_dir
from finetune.train import TrainResult


@dataclass
class BaseModel:
    """A store model loaded for training: fp32 weights, trainable, on the CPU."""

    name: str
    manifest: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    model_dir: Path

    @property
    def sha256(self) -> str:
        return self.manifest.get("sha256") or ""

    def tokenizer_files(self) -> dict[str, Path]:
        """The tokenizer files of the base folder, to copy into a derived model (destination name -> path)."""
        files = (self.manifest.get("tokenizer") or {}).get("files") or {}
        return {f: self.model_dir / f for f in files.values()}


def load_base(name: str, root: str | Path | None = None) -> BaseModel:
    """Load ``name`` from the store as a float32 GPT in train mode (weights copied out of the mmap)."""
    from engine.config import ModelConfig
    from engine.model import GPT
    from engine.tokenizer import load_tokenizer
    from weights import store

    manifest, state = store.read(name, root)
    config = ModelConfig.from_dict(manifest["config"])
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu").float()
    model.load_state_dict(state, strict=True)
    if config.pos_emb == "rope":  # non-persistent angle tables, rebuilt after to_empty
        from engine.model import build_rope_cache

        model.rope_cos, model.rope_sin = build_rope_cache(config)
    del state
    model_dir = store.model_dir(name, root)
    tokenizer = load_tokenizer(model_dir, manifest.get("tokenizer") or {"type": "none"})
    return BaseModel(name=name, manifest=manifest, model=model, tokenizer=tokenizer, model_dir=model_dir)


def end_of_text_id(tokenizer: Any, fmt: Any) -> int:
    """The id that ends every training row (and pads it): ChatML's ``<|im_end|>`` when it is a special token,
    else the tokenizer's first EOS (GPT-2: 50256, the book's pad and end-of-text)."""
    if fmt.name == "chatml" and tokenizer.is_special("<|im_end|>"):
        return tokenizer.special_id("<|im_end|>")
    if not tokenizer.eos_token_ids:
        raise ValueError("the tokenizer has no end-of-text id; the model's manifest must list eos_token_ids")
    return int(tokenizer.eos_token_ids[0])


@dataclass
class InstructionRun:
    """Everything an instruction-finetuning command needs besides the model-specific part."""

    base: BaseModel
    fmt: Any
    train_set: Any
    val_set: Any
    test_entries: list[dict[str, str]]
    val_entries: list[dict[str, str]]
    collate: Callable[[Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]
    max_length: int
    eos_id: int
    skipped: dict[str, int]


def prepare_instruction_run(args: TrainArgs, base: BaseModel | None = None) -> InstructionRun:
    """Load the base and the data, split it the book's way and build datasets + collate for ``args``."""
    from functools import partial

    from engine.prompts import get_prompt_format
    from finetune.data import InstructionDataset, custom_collate_fn, load_instruction_data, split_data

    if not args.model:
        raise ValueError("--model is required: the name of a base model in the store (python -m weights list)")
    base = base or load_base(args.model, args.models_dir)
    fmt = get_prompt_format(args.format)
    entries = load_instruction_data(args.data)
    if args.limit is not None:
        entries = entries[:args.limit]
    train_entries, test_entries, val_entries = split_data(entries)
    context = base.model.config.context_length
    max_length = min(args.max_length or context, context)
    eos = end_of_text_id(base.tokenizer, fmt)
    train_set = InstructionDataset(train_entries, base.tokenizer, fmt, max_length=max_length, eos_token_id=eos)
    val_set = InstructionDataset(val_entries, base.tokenizer, fmt, max_length=max_length, eos_token_id=eos)
    collate = partial(custom_collate_fn, pad_token_id=eos, eos_token_id=eos, allowed_max_length=max_length,
                      mask_instructions=args.mask_instructions)
    return InstructionRun(base=base, fmt=fmt, train_set=train_set, val_set=val_set, test_entries=test_entries,
                          val_entries=val_entries, collate=collate, max_length=max_length, eos_id=eos,
                          skipped={"train": len(train_set.skipped), "val": len(val_set.skipped)})


def build_sample_fn(run: InstructionRun, max_new_tokens: int) -> Callable[[nn.Module], str] | None:
    """After each epoch, the book's sample: a greedy answer to the first validation entry, through the engine."""
    if not run.val_entries or max_new_tokens <= 0:
        return None
    from finetune.evaluate import generate_response

    entry = run.val_entries[0]

    def sample(model: nn.Module) -> str:
        return generate_response(model, run.base.tokenizer, run.fmt, entry, max_new_tokens=max_new_tokens)

    return sample


def early_exit_code(result: TrainResult) -> int | None:
    """The command's exit code when there is nothing to report: ranks other than 0, or an interrupted run (130,
    after saying how to resume). ``None`` means rank 0 finished and should print its summary."""
    if result.rank != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted after step {result.steps}; resume with the same command plus --resume "
              f"(checkpoint in {result.run_dir})")
        return 130
    return None


def default_run_dir(args: TrainArgs, kind: str) -> Path:
    """Where a run keeps its checkpoint, metrics and plot: ``--run-dir``, else ``<cache>/runs/<kind>/<out>`` (LoRA
    runs are keyed by base and adapter name, since adapters of different bases may share a name)."""
    if args.run_dir:
        return Path(args.run_dir)
    name = args.out or f"{kind}-run"
    base = f"{args.model}--{name}" if kind == "lora" and args.model else name
    return cache_dir() / "runs" / kind / base
