"""``python -m finetune {sft,lora,pretrain,evaluate,bench} ...``: dispatch to each command's ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sft": ("finetune.sft", "full instruction finetuning into a new store model"),
    "lora": ("finetune.lora", "LoRA finetuning (peft) into an adapter next to the base model"),
    "pretrain": ("finetune.pretrain", "the book's ch. 5 pretraining loop on a plain text file"),
    "evaluate": ("finetune.evaluate", "answer the test split through the engine and score with a judge"),
    "bench": ("finetune.bench", "training tokens/s: ours vs HF Trainer + peft, LoRA vs full SFT"),
}


def usage() -> str:
    lines = ["usage: python -m finetune COMMAND [options]   (python -m finetune COMMAND --help)", "", "commands:"]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
