"""Training options and their command line: :class:`TrainArgs` (the options every training command shares, with
attribute docstrings in the style of litgpt's ``args.py``), the dataclass -> argparse plumbing that turns each field
into a ``--kebab-name`` option helped by its docstring (what litgpt gets from jsonargparse), and
:func:`validate_args`, which rejects values that cannot work with a message naming the fix. Commands subclass
``TrainArgs`` (``SFTArgs``, ``LoraArgs``, ``PretrainArgs``) and evaluation reuses the parser builder.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass
class TrainArgs:
    """Options shared by every training command (defaults follow the book's ch. 7)."""

    model: str | None = None
    """Base model name in the store ($CHAT_MODELS_DIR)."""
    data: str | None = None
    """Training data file; for sft/lora a JSON/JSONL with instruction/input/output (default: the book's
    instruction-data.json, downloaded once into the cache)."""
    format: str = field(default="alpaca", metadata={"choices": ("alpaca", "phi3", "chatml", "none")})
    """Prompt format: alpaca, phi3 or chatml (none: plain text, for pretraining)."""
    out: str | None = None
    """Name of the new model (sft/pretrain) or adapter (lora) in the store."""
    epochs: int = 2
    """Passes over the training split."""
    batch_size: int = 8
    """Global batch of one optimizer step; split across DDP processes and --grad-accum micro-batches."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    max_length: int | None = None
    """Longest training sequence in tokens (collate's allowed_max_length); default: the model's context length.
    Longer entries are skipped and counted."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the global batch is split into this many forward passes)."""
    mask_instructions: bool = False
    """Ignore the prompt tokens in the loss (the book's exercise 7.2)."""
    seed: int = 123
    """Seed for initialisation, data order and dropout."""
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    """Compute dtype: fp32, or bf16 (autocast on CPU and GPU; master weights stay fp32)."""
    resume: bool = False
    """Continue from the run directory's checkpoint (written on Ctrl-C/SIGTERM or every --save-every steps)."""
    eval_every: int = 20
    """Compute the validation loss every this many optimizer steps (0: only before and after training)."""
    eval_iter: int = 5
    """Validation batches per evaluation (the book's eval_iter)."""
    save_every: int = 0
    """Also write a resumable checkpoint every this many steps (0: only on interruption)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (the output is still saved)."""
    limit: int | None = None
    """Use only the first N data entries before the split (quick experiments)."""
    sample_tokens: int = 35
    """New tokens of the sample generation on the first validation entry after each epoch (0: off)."""
    run_dir: str | None = None
    """Where checkpoints, metrics and the loss plot go while training (default: <cache>/runs/<out>)."""
    models_dir: str | None = None
    """Model store root (default: $CHAT_MODELS_DIR or ./models)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int | None = None
    """torch intra-op CPU threads (default: torch's choice; torchrun sets 1 per process)."""
    progress: bool = True
    """Show a tqdm progress bar."""



def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field), for --help, like litgpt's jsonargparse use."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not hasattr(klass, "__dataclass_fields__"):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = ()) -> None:
    """One ``--kebab-name`` option per dataclass field, typed from its annotation, helped by its docstring."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help ("10%" would raise)
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=default, help=help_text,
                                choices=f.metadata.get("choices"))



def build_parser(cls: type, prog: str, description: str, *, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An argparse parser (defaults shown in --help) with one option per field of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, cls, skip=skip)
    return parser


def args_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """Build ``cls`` by keyword from the parsed options that are its fields."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def validate_args(args: TrainArgs) -> None:
    """Raise ValueError for option values that cannot work, naming the fix."""
    if args.format not in ("alpaca", "phi3", "chatml", "none"):
        raise ValueError(f"--format must be alpaca, phi3 or chatml, got {args.format!r}")
    if args.dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {args.dtype!r}")
    for name in ("epochs", "batch_size", "grad_accum", "eval_iter"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
