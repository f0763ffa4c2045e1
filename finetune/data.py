"""Training data: instruction data (download, cache, validate), the book's split, datasets and the collate rules.

Follows Raschka, *Build a Large Language Model (From Scratch)*: ch. 2 (the sliding-window pretraining loader,
``GPTDatasetV1`` / ``create_dataloader_v1``) and ch. 7 (``download_and_load_file``, the 85/10/5 split,
``InstructionDataset`` and ``custom_collate_fn`` with exercise 7.2's instruction masking). Prompts are rendered by
the very same :mod:`engine.prompts` objects the chat engine uses, and masking is by encoded prompt length, like
litgpt's ``data/base.py``, so it works for every format.

Collate rules (the book's, pinned by golden tests): each row is padded to the batch's longest row + 1 with the pad
id; ``inputs = padded[:-1]``, ``targets = padded[1:]``; the first end-of-text in the targets is kept (so the model
learns to stop) and every later pad becomes ``ignore_index`` (-100); with ``mask_instructions`` the prompt part of the
targets (``targets[:instruction_length - 1]``) is ignored too; ``allowed_max_length`` truncates last.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

log = logging.getLogger(__name__)

INSTRUCTION_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
REQUIRED_FIELDS = ("instruction", "input", "output")
IGNORE_INDEX = -100
GPT2_EOT_ID = 50256


def cache_dir() -> Path:
    """The download cache: ``$SCRATCHCHAT_CACHE`` or ``~/.cache/scratchchat``."""
    return Path(os.environ.get("SCRATCHCHAT_CACHE") or Path.home() / ".cache" / "scratchchat")


def download_file(url: str, dest: Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless it is already there; the write is atomic (temp file + rename).

    Raises:
        OSError: on a network or HTTP error, with the URL and the fix in the message (never swallowed).
    """
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except OSError as exc:
        raise OSError(f"could not download {url}: {exc}. Pass --data with a local JSON/JSONL file instead.") from exc
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def default_instruction_data_path() -> Path:
    """The book's ``instruction-data.json``, downloaded from its original URL into the cache once and reused."""
    return download_file(INSTRUCTION_DATA_URL, cache_dir() / "data" / "instruction-data.json")


def read_records(path: str | Path) -> list[Any]:
    """Read a JSON array or a JSONL file (one object per line) without validating it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file {path} does not exist; pass --data with an existing file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path} is empty; it needs at least one entry with instruction/input/output")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno} is not valid JSON (expected JSONL, one object a line): {exc}") \
                from exc
    return records


def validate_entries(data: Any, source: str = "data") -> list[dict[str, str]]:
    """Check every entry has string ``instruction``/``output`` (and ``input``, which may be empty or absent).

    An absent ``input`` is read as ``""`` (some Alpaca-style files omit it); a missing ``instruction`` or
    ``output``, or a non-string value, is an error naming the entry index and the field.

    Returns:
        The entries as plain dicts with exactly the three fields.
    """
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a list of entries, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{source}: no entries; the data needs at least one entry with instruction/input/output")
    clean = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is a {type(entry).__name__}, expected an object with "
                             f"instruction/input/output")
        for field in REQUIRED_FIELDS:
            if field not in entry:
                if field == "input":
                    continue
                raise ValueError(f"{source}: entry {i} is missing the field {field!r} (has {sorted(entry)})")
            if not isinstance(entry[field], str):
                raise ValueError(f"{source}: entry {i} field {field!r} must be a string, got "
                                 f"{type(entry[field]).__name__}")
        if not entry["instruction"].strip():
            raise ValueError(f"{source}: entry {i} has an empty 'instruction'")
        clean.append({"instruction": entry["instruction"], "input": entry.get("input", ""), "output": entry["output"]})
    return clean


def load_instruction_data(path: str | Path | None = None) -> list[dict[str, str]]:
    """Load and validate instruction data; ``None`` means the book's file (downloaded once into the cache)."""
    path = default_instruction_data_path() if path is None else Path(path)
    return validate_entries(read_records(path), source=str(path))


def split_data(data: Sequence[Any], train_frac: float = 0.85, test_frac: float = 0.10
               ) -> tuple[list[Any], list[Any], list[Any]]:
    """The book's split, in its order: train = first 85%, test = next 10%, val = the rest (no shuffling).

    Returns:
        (train, test, val); 935 / 110 / 55 for the book's 1,100 entries.
    """
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train = list(data[:train_portion])
    test = list(data[train_portion:train_portion + test_portion])
    val = list(data[train_portion + test_portion:])
    return train, test, val


@dataclass(frozen=True)
class Example:
    """One encoded training example: ``ids`` = prompt + response tokens, the first ``prompt_length`` are prompt."""

    prompt_length: int
    ids: list[int]


def encode_example(entry: dict[str, str], tokenizer: Any, fmt: Any, eos_token_id: int | None = None) -> Example:
    """Encode prompt + response with the shared prompt format; the prompt length is what masking uses.

    ``fmt.encode_example`` (engine.prompts) encodes the prompt and the response part; template markers become special
    ids where the tokenizer has them (ChatML on SmolLM2) and stay plain text otherwise (Alpaca/Phi-3 on GPT-2, as
    in the book). A trailing ``eos_token_id`` (ChatML's ``<|im_end|>`` when it is the model's end-of-text) is
    dropped, since the collate function appends exactly one end-of-text to every row.
    """
    ids, prompt_length = fmt.encode_example(entry["instruction"], entry["input"], entry["output"], tokenizer)
    ids = list(ids)
    if eos_token_id is not None and len(ids) > prompt_length and ids[-1] == eos_token_id:
        ids = ids[:-1]
    return Example(prompt_length, ids)


class InstructionDataset(Dataset):
    """Pre-tokenized instruction examples (the book's ``InstructionDataset`` + exercise 7.2's lengths).

    Entries whose encoded length + 1 (the end-of-text) exceeds ``max_length`` are skipped and counted in
    ``skipped`` (a list of entry indices) with a warning, or raise ``ValueError`` when ``on_too_long="error"``.
    ``__getitem__`` returns ``(prompt_length, ids)``, the item shape :func:`custom_collate_fn` masks with.
    """

    def __init__(self, data: Sequence[dict[str, str]], tokenizer: Any, fmt: Any, *, max_length: int | None = None,
                 on_too_long: str = "skip", eos_token_id: int | None = None) -> None:
        if on_too_long not in ("skip", "error"):
            raise ValueError(f"on_too_long must be 'skip' or 'error', got {on_too_long!r}")
        self.examples: list[Example] = []
        self.skipped: list[int] = []
        for i, entry in enumerate(data):
            ex = encode_example(entry, tokenizer, fmt, eos_token_id)
            if max_length is not None and len(ex.ids) + 1 > max_length:
                if on_too_long == "error":
                    raise ValueError(f"entry {i} has {len(ex.ids) + 1} tokens with the end-of-text, more than the "
                                     f"context of {max_length}; shorten it or use --max-length/skip")
                self.skipped.append(i)
                continue
            self.examples.append(ex)
        if self.skipped:
            log.warning("skipped %d of %d entries longer than %d tokens (indices %s%s)", len(self.skipped),
                        len(data), max_length, self.skipped[:10], "..." if len(self.skipped) > 10 else "")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, list[int]]:
        ex = self.examples[index]
        return ex.prompt_length, ex.ids

    def num_tokens(self) -> int:
        return sum(len(ex.ids) for ex in self.examples)


def custom_collate_fn(
    batch: Sequence[Sequence[int] | tuple[int, Sequence[int]]],
    pad_token_id: int = GPT2_EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
    *,
    mask_instructions: bool = False,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's collate: pad to batch max + 1, shift, keep the first end-of-text, mask later pads.

    Args:
        batch: token-id lists, or ``(instruction_length, ids)`` pairs from :class:`InstructionDataset`.
        pad_token_id: pads rows (and ends them when ``eos_token_id`` is None, as GPT-2's 50256 does in the book).
        ignore_index: the target value ``cross_entropy`` skips.
        allowed_max_length: truncate inputs and targets to this many positions (applied last).
        device: where the returned tensors live.
        mask_instructions: exercise 7.2, ``targets[:instruction_length - 1] = ignore_index``; needs pairs.
        eos_token_id: the end-of-text appended to each row, when it differs from the pad id.

    Returns:
        (inputs, targets), both (B, L) int64 with L = longest row + 1 (or ``allowed_max_length``).
    """
    eos = pad_token_id if eos_token_id is None else eos_token_id
    items, instruction_lengths = [], []
    for item in batch:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            instruction_lengths.append(item[0])
            items.append(list(item[1]))
        else:
            instruction_lengths.append(None)
            items.append(list(item))
    if mask_instructions and any(n is None for n in instruction_lengths):
        raise ValueError("mask_instructions needs (instruction_length, ids) items, as InstructionDataset yields")
    batch_max_length = max(len(ids) + 1 for ids in items)
    inputs_lst, targets_lst = [], []
    for ids, instruction_length in zip(items, instruction_lengths):
        new_item = ids + [eos]  # one end-of-text per row
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # (L,)
        targets = torch.tensor(padded[1:])  # (L,)
        # Keep the first end-of-text target (position len(ids) - 1), ignore every pad after it. For eos == pad this
        # is the book's "targets == pad_token_id, indices[1:] = ignore_index", since our tokenizer never produces
        # the end-of-text id from plain text.
        targets[len(ids):] = ignore_index
        if mask_instructions:
            targets[:instruction_length - 1] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def _sampler_seed(seed: int) -> int:
    """The seed ``RandomSampler`` gets in the book: the second int64 drawn after ``torch.manual_seed(seed)`` (the
    DataLoader iterator draws its base seed first)."""
    draws = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=draws)
    return int(torch.empty((), dtype=torch.int64).random_(generator=draws))


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of ``n`` examples: the book's first-epoch order for ``seed``, later epochs continue the
    same sampler generator (as :func:`build_instruction_loader` does across epochs)."""
    generator = torch.Generator().manual_seed(_sampler_seed(seed))
    for _ in range(epoch):
        torch.randperm(n, generator=generator)
    return torch.randperm(n, generator=generator).tolist()


def build_instruction_loader(dataset: Dataset, *, batch_size: int = 8, shuffle: bool = True, drop_last: bool = True,
                             seed: int = 123, **collate_kwargs: Any) -> DataLoader:
    """A DataLoader as in the book (``torch.manual_seed(123)`` before the train loader, ``num_workers=0``).

    The book seeds the global RNG; its DataLoader iterator then draws a base seed from it and ``RandomSampler``
    draws its own seed next. We take the sampler's seed from a private generator instead (:func:`shuffled_order`),
    so the first epoch's order is the book's without touching the global RNG.
    """
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(_sampler_seed(seed))) if shuffle \
        else None

    def collate(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return custom_collate_fn(batch, **collate_kwargs)

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0,
                      collate_fn=collate)


class SlidingWindowDataset(Dataset):
    """The book's ``GPTDatasetV1``: windows of ``max_length`` tokens every ``stride`` tokens; targets shifted by one."""

    def __init__(self, token_ids: Sequence[int], max_length: int, stride: int) -> None:
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        if len(token_ids) <= max_length:
            raise ValueError(f"the text has {len(token_ids)} tokens, need more than max_length={max_length}; use a "
                             f"longer text or a smaller --max-length")
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        starts = range(0, len(ids) - max_length, stride)
        self.input_ids = [ids[i:i + max_length] for i in starts]
        self.target_ids = [ids[i + 1:i + max_length + 1] for i in starts]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.target_ids[index]


def stack_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`SlidingWindowDataset` items (every window has the same length)."""
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def create_dataloader(text: str, tokenizer: Any, *, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """The book's ``create_dataloader_v1`` on a plain text, with its defaults."""
    dataset = SlidingWindowDataset(tokenizer.encode(text), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)
