"""finetune.data: the book's golden vectors (ch. 2 sliding window, ch. 7 split/collate/masking) and bad-data errors."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.prompts import get_prompt_format
from engine.tokenizer import load_gpt2_tokenizer
from finetune import data as fdata
from finetune.data import (
    InstructionDataset,
    SlidingWindowDataset,
    build_instruction_loader,
    create_dataloader,
    custom_collate_fn,
    load_instruction_data,
    split_data,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "instruction-data.json"


@pytest.fixture(scope="module")
def tokenizer():
    return load_gpt2_tokenizer(SHARED / "data" / "gpt2" / "encoder.json", SHARED / "data" / "gpt2" / "vocab.bpe")


@pytest.fixture(scope="module")
def entries():
    return load_instruction_data(DATA)


def test_collate_golden_vector():
    inputs, targets = custom_collate_fn(([0, 1, 2, 3, 4], [5, 6], [7, 8, 9]))
    assert torch.equal(inputs, torch.tensor([[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]))
    assert torch.equal(targets, torch.tensor([[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100],
                                              [8, 9, 50256, -100, -100]]))


def test_collate_allowed_max_length():
    inputs, targets = custom_collate_fn(([0, 1, 2, 3, 4], [5, 6], [7, 8, 9]), allowed_max_length=3)
    assert torch.equal(inputs, torch.tensor([[0, 1, 2], [5, 6, 50256], [7, 8, 9]]))
    assert torch.equal(targets, torch.tensor([[1, 2, 3], [6, 50256, -100], [8, 9, 50256]]))


def test_collate_separate_eos_and_pad():
    inputs, targets = custom_collate_fn(([1, 2, 3], [4]), pad_token_id=0, eos_token_id=2)
    assert torch.equal(inputs, torch.tensor([[1, 2, 3], [4, 2, 0]]))
    assert torch.equal(targets, torch.tensor([[2, 3, 2], [2, -100, -100]]))


def test_ignore_index_semantics():
    logits_1 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5]])
    loss_1 = F.cross_entropy(logits_1, torch.tensor([0, 1]))
    logits_2 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    loss_2 = F.cross_entropy(logits_2, torch.tensor([0, 1, 1]))
    loss_3 = F.cross_entropy(logits_2, torch.tensor([0, 1, fdata.IGNORE_INDEX]))
    torch.testing.assert_close(loss_1, torch.tensor(1.1269), rtol=0, atol=1e-4)
    torch.testing.assert_close(loss_2, torch.tensor(0.7936), rtol=0, atol=1e-4)
    assert torch.equal(loss_1, loss_3)


def test_book_split_sizes_and_entries(entries):
    assert len(entries) == 1100
    assert entries[50] == {"instruction": "Identify the correct spelling of the following word.",
                           "input": "Ocassion", "output": "The correct spelling is 'Occasion.'"}
    train, test, val = split_data(entries)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert val[0]["instruction"] == "Convert the active sentence to passive: 'The chef cooks the meal every day.'"
    assert train == entries[:935] and test == entries[935:1045] and val == entries[1045:]


def test_alpaca_token_lengths(tokenizer, entries):
    fmt = get_prompt_format("alpaca")
    ds = InstructionDataset(entries, tokenizer, fmt)
    assert len(ds) == 1100 and ds.skipped == []
    prompt_len, ids = ds[50]
    assert (prompt_len, len(ids)) == (43, 57)
    lengths = [len(ids) for _, ids in ds]
    assert (min(lengths), max(lengths)) == (40, 91)
    # The prompt/response encoding equals the book's encode(format_input(entry) + response_text).
    e = entries[50]
    assert ids == tokenizer.encode(fmt.format(e["instruction"], e["input"]) + fmt.response(e["output"]))


def test_train_loader_116_batches_of_8(tokenizer, entries):
    train, _, _ = split_data(entries)
    ds = InstructionDataset(train, tokenizer, get_prompt_format("alpaca"), max_length=1024)
    loader = build_instruction_loader(ds, batch_size=8, shuffle=True, drop_last=True, seed=123,
                                      allowed_max_length=1024)
    batches = list(loader)
    assert len(batches) == 116
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.shape[0] == 8
        assert 57 <= inputs.shape[1] <= 91
    # The book's order (torch.manual_seed(123)): its last printed batch is [8, 69], row 0 = training entry #563
    # (60 real tokens + 9 pads), targets shifted, one 50256 kept, then 9 x -100.
    inputs, targets = batches[-1]
    assert inputs.shape == (8, 69)
    e = train[563]
    assert e["input"] == "The baby is very cute."
    ids = ds[563][1]
    assert len(ids) == 60 and inputs[0].tolist() == ids + [50256] * 9
    assert targets[0].tolist() == ids[1:] + [50256] + [-100] * 9


def test_instruction_masking_golden_vector(tokenizer, entries):
    fmt = get_prompt_format("alpaca")
    sample = [entries[999], entries[43], entries[265]]
    ds = InstructionDataset(sample, tokenizer, fmt)
    assert [ds[i][0] for i in range(3)] == [35, 47, 48]
    assert [len(ds[i][1]) for i in range(3)] == [54, 62, 64]
    inputs, targets = custom_collate_fn([ds[i] for i in range(3)], mask_instructions=True)
    assert inputs.shape == targets.shape == (3, 64)
    row = targets[1].tolist()
    assert row[:46] == [-100] * 46
    assert row[46:] == [198, 198, 21017, 18261, 25, 198, 34, 12204, 375, 576, 11, 42651, 11, 1168, 37052, 50256,
                        -100, -100]
    kept = [t for t in row if t != -100]
    assert tokenizer.decode(kept) == "\n\n### Response:\nCrocodile, Elephant, Zebra<|endoftext|>"


@pytest.mark.parametrize("name", ["alpaca", "phi3"])
def test_first_unmasked_target_starts_the_response(tokenizer, entries, name):
    fmt = get_prompt_format(name)
    ds = InstructionDataset(entries[:16], tokenizer, fmt)
    _, targets = custom_collate_fn([ds[i] for i in range(16)], mask_instructions=True)
    marker = "\n\n### Response:" if name == "alpaca" else "\n<|assistant|>:"
    for i in range(16):
        prompt_len, ids = ds[i]
        row = targets[i].tolist()
        first = next(j for j, t in enumerate(row) if t != -100)
        assert first == prompt_len - 1 and row[first] == ids[prompt_len]
        assert tokenizer.decode([t for t in row if t != -100]).startswith(marker)
    # without masking, the prompt is trained on too (the book's default)
    _, unmasked = custom_collate_fn([ds[i] for i in range(16)])
    assert (unmasked[:, 0] != -100).all()


def test_sliding_window_golden_batches(tokenizer):
    text = (SHARED / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    assert len(tokenizer.encode(text)) == 5145
    inputs, targets = next(iter(create_dataloader(text, tokenizer, batch_size=4, max_length=2, stride=2,
                                                  shuffle=False)))
    assert torch.equal(inputs, torch.tensor([[40, 367], [2885, 1464], [1807, 3619], [402, 271]]))
    assert torch.equal(targets[0], torch.tensor([367, 2885]))
    inputs, _ = next(iter(create_dataloader(text, tokenizer, batch_size=4, max_length=8, stride=2, shuffle=False)))
    assert inputs[0].tolist() == [40, 367, 2885, 1464, 1807, 3619, 402, 271]
    assert inputs[3].tolist() == [402, 271, 10899, 2138, 257, 7026, 15632, 438]
    ids = tokenizer.encode(text)
    assert [len(SlidingWindowDataset(ids, m, s)) for m, s in ((2, 2), (8, 2), (4, 4))] == [2572, 2569, 1286]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_missing_field_names_index_and_field(tmp_path):
    bad = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]
    with pytest.raises(ValueError, match=r"entry 1 is missing the field 'output'"):
        load_instruction_data(_write(tmp_path / "bad.json", bad))
    with pytest.raises(ValueError, match=r"entry 0 field 'output' must be a string"):
        load_instruction_data(_write(tmp_path / "bad2.json", [{"instruction": "a", "output": 3}]))


def test_empty_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no entries"):
        load_instruction_data(_write(tmp_path / "empty.json", []))
    (tmp_path / "blank.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_instruction_data(tmp_path / "blank.jsonl")
    with pytest.raises(FileNotFoundError):
        load_instruction_data(tmp_path / "nope.json")


def test_jsonl_and_missing_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n',
                    encoding="utf-8")
    assert load_instruction_data(path) == [{"instruction": "a", "input": "", "output": "b"},
                                           {"instruction": "c", "input": "d", "output": "e"}]


def test_too_long_entries_are_skipped_and_counted(tokenizer, entries):
    fmt = get_prompt_format("alpaca")
    ds = InstructionDataset(entries[:50], tokenizer, fmt, max_length=60)
    lengths = [len(fmt.encode_example(e["instruction"], e["input"], e["output"], tokenizer)[0]) for e in entries[:50]]
    expected = [i for i, n in enumerate(lengths) if n + 1 > 60]
    assert expected and ds.skipped == expected
    assert len(ds) == 50 - len(expected)
    with pytest.raises(ValueError, match=rf"entry {expected[0]} has \d+ tokens"):
        InstructionDataset(entries[:50], tokenizer, fmt, max_length=60, on_too_long="error")


def test_download_caches_and_reuses(tmp_path, monkeypatch):
    payload = json.dumps([{"instruction": "a", "input": "", "output": "b"}]).encode()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/instruction-data.json"
        monkeypatch.setattr(fdata, "INSTRUCTION_DATA_URL", url)
        monkeypatch.setenv("SCRATCHCHAT_CACHE", str(tmp_path))
        first = fdata.default_instruction_data_path()
        second = fdata.default_instruction_data_path()
        assert first == second == tmp_path / "data" / "instruction-data.json"
        assert hits == ["/instruction-data.json"]  # downloaded once, then reused from the cache
        assert load_instruction_data(None) == [{"instruction": "a", "input": "", "output": "b"}]
        with pytest.raises(OSError, match="could not download"):
            fdata.download_file("http://127.0.0.1:1/x.json", tmp_path / "x.json", timeout=2)
    finally:
        server.shutdown()
        server.server_close()


def test_chatml_rows_end_with_one_im_end(smollm2_store, entries):
    """ChatML on SmolLM2: markers are special ids, and each row ends with exactly one <|im_end|> (kept in targets)."""
    from engine.tokenizer import load_tokenizer
    from finetune.runs import end_of_text_id
    from weights import store

    manifest = store.read_manifest("smollm2-135m-instruct", smollm2_store)
    tok = load_tokenizer(store.model_dir("smollm2-135m-instruct", smollm2_store), manifest["tokenizer"])
    fmt = get_prompt_format("chatml")
    eos = end_of_text_id(tok, fmt)
    assert eos == tok.special_id("<|im_end|>")
    ds = InstructionDataset([entries[43]], tok, fmt, eos_token_id=eos)
    prompt_len, ids = ds[0]
    assert ids[0] == tok.special_id("<|im_start|>") and ids[-1] != eos
    assert tok.decode(ids[:prompt_len]) == ("<|im_start|>user\nSort the following list in alphabetical order.\n\n"
                                            "Zebra, Elephant, Crocodile<|im_end|>\n<|im_start|>assistant\n")
    _, targets = custom_collate_fn([ds[0], (3, [1, 2, 3])], pad_token_id=eos, eos_token_id=eos,
                                   mask_instructions=True)
    kept = [t for t in targets[0].tolist() if t != -100]
    assert tok.decode(kept) == "Crocodile, Elephant, Zebra<|im_end|>"
