"""The model store: manifest contents, atomic writes, bad input with one-line errors, the list table, adapters.

Oracles here are the files themselves (sha256 recomputed, safetensors re-read), what a concurrent reader sees in the
middle of a write, and peft's own ``save_pretrained`` output for the adapter format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model import GPT
from weights import adapters, store
from weights.__main__ import main

TINY_LLAMA = ModelConfig(vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=48, norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_base=100000.0, bias=False,
                         qkv_bias=False, tie_embeddings=True)
TINY_GPT2 = ModelConfig(vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128)


def _state(config: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return GPT(config).state_dict()


def _add(root: Path, name: str = "tiny", config: ModelConfig = TINY_LLAMA, **kw) -> dict:
    return store.add_model(name, config.to_dict(), _state(config), root=root, source={"format": "test"}, **kw)


def _hf_gpt2_folder(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_manifest_contents_and_mmap_read(tmp_path: Path) -> None:
    manifest = _add(tmp_path, prompt_format="chatml", generation={"temperature": 0.2}, system_prompt="Be brief.")
    folder = tmp_path / "tiny"
    on_disk = json.loads((folder / "model.json").read_text())
    assert on_disk == manifest
    expected_keys = {"name", "family", "config", "tokenizer", "prompt_format", "dtype", "num_parameters", "source",
                     "sha256", "created_from", "created_at", "generation", "system_prompt"}
    assert set(manifest) == expected_keys
    assert manifest["family"] == "llama" and manifest["dtype"] == "float32"
    assert manifest["config"] == TINY_LLAMA.to_dict() and manifest["tokenizer"] == {"type": "none"}
    assert manifest["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["num_parameters"] == TINY_LLAMA.num_parameters() == GPT(TINY_LLAMA).num_parameters()
    got_manifest, state = store.read("tiny", tmp_path)
    assert got_manifest == manifest
    assert "lm_head.weight" not in state  # tied: the embedding is stored once
    for k, v in _state(TINY_LLAMA).items():
        assert torch.equal(state[k], v)
    model = GPT(TINY_LLAMA)
    model.load_state_dict(state, strict=True)


def test_bfloat16_on_disk_and_dtype_at_load(tmp_path: Path) -> None:
    _add(tmp_path, dtype="bfloat16")
    manifest, state = store.read("tiny", tmp_path)
    assert manifest["dtype"] == "bfloat16" and state["tok_emb.weight"].dtype == torch.bfloat16
    _, state32 = store.read("tiny", tmp_path, dtype="float32")
    assert state32["tok_emb.weight"].dtype == torch.float32
    assert (tmp_path / "tiny" / "model.safetensors").stat().st_size < 0.6 * 4 * manifest["num_parameters"]


def test_add_is_atomic_and_refuses_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    seen_during_write = []
    real_save = safetensors.torch.save_file

    def spying_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        seen_during_write.append([m["name"] for m in store.list_models(tmp_path)])

    monkeypatch.setattr(safetensors.torch, "save_file", spying_save)
    _add(tmp_path, "a")
    assert seen_during_write == [[]]  # a reader in the middle of the write sees no model yet
    assert [m["name"] for m in store.list_models(tmp_path)] == ["a"]
    with pytest.raises(FileExistsError):
        _add(tmp_path, "a")
    replaced = _add(tmp_path, "a", config=TINY_GPT2, overwrite=True)
    assert store.read_manifest("a", tmp_path) == replaced and replaced["family"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folders left behind


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_import_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc) -> None:
    import safetensors.torch

    src = _hf_gpt2_folder(tmp_path / "hf")
    root = tmp_path / "models"
    root.mkdir()

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # half a file, then the process "dies"
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(type(exc)):
        store.import_path(src, "half", root=root)
    assert store.list_models(root) == []
    assert list(root.iterdir()) == []  # not even a hidden temp folder


def test_truncated_safetensors_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _hf_gpt2_folder(tmp_path / "hf")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    root = tmp_path / "models"
    root.mkdir()
    capsys.readouterr()
    assert main(["--models-dir", str(root), "import", str(src), "--name", "cut"]) == 2
    err = _one_line(capsys)
    assert str(weights) in err and "truncated or corrupt" in err and "re-download" in err
    assert list(root.iterdir()) == []

    # the same damage inside the store is caught on read, naming the file and the fix
    _add(root, "ok")
    stored = root / "ok" / "model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt.*re-import"):
        store.read("ok", root)


def test_shape_mismatch_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _hf_gpt2_folder(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_positions"] = 16  # the file's wpe has 32 rows
    (src / "config.json").write_text(json.dumps(cfg))
    root = tmp_path / "models"
    root.mkdir()
    capsys.readouterr()
    assert main(["--models-dir", str(root), "import", str(src), "--name", "bad"]) == 2
    err = _one_line(capsys)
    assert "pos_emb.weight" in err and "(32, 32)" in err and "(16, 32)" in err and str(src) in err
    assert list(root.iterdir()) == []


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    state = _state(TINY_LLAMA)
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.1.mlp.up_proj.weight'\]"):
        store.add_model("m", TINY_LLAMA.to_dict(), missing, root=tmp_path)
    extra = {**state, "lm_head.weight": state["tok_emb.weight"]}  # a head although the config ties it
    with pytest.raises(ValueError, match="unexpected tensors.*lm_head.weight"):
        store.add_model("m", TINY_LLAMA.to_dict(), extra, root=tmp_path)
    assert not tmp_path.joinpath("m").exists()


def test_list_cli_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _add(tmp_path, "llama-tiny", prompt_format="chatml")
    _add(tmp_path, "gpt2-tiny", config=TINY_GPT2, dtype="bfloat16")
    (tmp_path / "llama-tiny" / "adapters" / "ad1").mkdir(parents=True)
    (tmp_path / "llama-tiny" / "adapters" / "ad1" / "adapter_config.json").write_text("{}")
    (tmp_path / ".tmp-junk-123").mkdir()  # an interrupted write: invisible
    capsys.readouterr()
    assert main(["--models-dir", str(tmp_path), "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "PARAMS", "DTYPE", "FORMAT", "ADAPTERS"]
    assert lines[1].split() == ["gpt2-tiny", "gpt2", f"{TINY_GPT2.num_parameters() / 1e3:.1f}K", "bfloat16", "none",
                                "-"]
    assert lines[2].split() == ["llama-tiny", "llama", f"{TINY_LLAMA.num_parameters() / 1e3:.1f}K", "float32",
                                "chatml", "ad1"]
    assert len(lines) == 3


def test_bad_names_and_unknown_model(tmp_path: Path) -> None:
    for bad in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="invalid name"):
            store.model_dir(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m weights fetch"):
        store.read("nope", tmp_path)


# --- adapters ------------------------------------------------------------------------------------------------------

def _peft_adapter(folder: Path, config: ModelConfig, targets: list[str], r: int = 4, **lora_kw) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(GPT(config), peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, **lora_kw))
    with torch.no_grad():  # lora_B starts at zero; make it non-trivial so the tensors are distinguishable
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(folder)


def test_adapter_read_matches_peft_layout(tmp_path: Path) -> None:
    _peft_adapter(tmp_path / "ad", TINY_LLAMA, ["q_proj", "v_proj", "down_proj"], use_rslora=True)
    config, tensors = adapters.read_adapter(tmp_path / "ad", TINY_LLAMA.to_dict())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is True
    assert config["scaling"] == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert set(config["scalings"]) == {(i, p) for i in range(2) for p in ("q_proj", "v_proj", "down_proj")}
    kv = TINY_LLAMA.n_kv_heads * TINY_LLAMA.head_dim
    assert tensors[(0, "q_proj", "A")].shape == (4, 32) and tensors[(0, "q_proj", "B")].shape == (32, 4)
    assert tensors[(1, "v_proj", "B")].shape == (kv, 4) and tensors[(1, "down_proj", "A")].shape == (4, 48)


def test_add_adapter_validates_base(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _add(root, "base")
    _add(root, "other", config=TINY_GPT2)
    _peft_adapter(tmp_path / "ad", TINY_LLAMA, ["q_proj", "k_proj"])
    meta = adapters.add_adapter("base", "qk", tmp_path / "ad", root, prompt_format="chatml")
    assert meta["base"] == "base" and meta["base_sha256"] == store.read_manifest("base", root)["sha256"]
    assert [a["name"] for a in store.list_adapters("base", root)] == ["qk"]
    config, tensors = adapters.read("base", "qk", root)
    assert config["scaling"] == 2.0 and len(tensors) == 2 * 2 * 2

    # shapes of another architecture are refused before anything is written
    with pytest.raises(ValueError, match=r"k_proj lora_B has shape \(16, 4\) but the base expects \(32, 4\)"):
        adapters.add_adapter("other", "qk", tmp_path / "ad", root)
    assert store.list_adapters("other", root) == []

    # a base that changed since training (sha256) is refused with the fix
    stored = store.adapter_dir("base", "qk", root)
    meta_json = json.loads((stored / "scratchchat.json").read_text())
    meta_json["base_sha256"] = "0" * 64
    (stored / "scratchchat.json").write_text(json.dumps(meta_json))
    with pytest.raises(ValueError, match="sha256 differs.*retrain"):
        adapters.read("base", "qk", root)
