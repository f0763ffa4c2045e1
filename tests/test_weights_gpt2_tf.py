"""OpenAI GPT-2 TF checkpoints: a tiny checkpoint in OpenAI's exact variable layout must import to HF's logits.

The checkpoint is written with tensorflow's v1 Saver from a random-weight transformers ``GPT2LMHeadModel`` (HF's
Conv1D weights are (in, out), as OpenAI's are, with OpenAI's extra leading 1: ``model/h0/attn/c_attn/w`` is
(1, d, 3d)), so that ``checkpoint``, ``model.ckpt.index`` and ``model.ckpt.data-00000-of-00001`` exist beside
``hparams.json``. Bad input and an offline ``fetch gpt2-small`` must fail with one line and leave the store alone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.config import ModelConfig  # noqa: E402
from engine.model import GPT  # noqa: E402
from weights import store  # noqa: E402
from weights.__main__ import main  # noqa: E402


def _tiny_hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                                  embd_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if ".ln_" in name and name.endswith("weight") else 0.0))
    return model


def _openai_variables(model) -> dict[str, np.ndarray]:
    """HF GPT-2 weights renamed and reshaped to OpenAI's checkpoint layout."""
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()}
    out = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"],
           "model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(model.config.n_layer):
        h = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"model/h{i}/{ln}/g"] = sd[h + ln + ".weight"]
            out[f"model/h{i}/{ln}/b"] = sd[h + ln + ".bias"]
        for conv in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            hf = h + conv.replace("/", ".")
            out[f"model/h{i}/{conv}/w"] = sd[hf + ".weight"][None]  # (1, in, out)
            out[f"model/h{i}/{conv}/b"] = sd[hf + ".bias"]
    return out


def _write_checkpoint(folder: Path, model) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    folder.mkdir(parents=True)
    variables = {name: tf.Variable(a.astype(np.float32)) for name, a in _openai_variables(model).items()}
    tf.compat.v1.train.Saver(var_list=variables).save(None, str(folder / "model.ckpt"), write_meta_graph=False)
    cfg = model.config
    (folder / "hparams.json").write_text(json.dumps({"n_vocab": cfg.vocab_size, "n_ctx": cfg.n_positions,
                                                     "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                                                     "n_layer": cfg.n_layer}))


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    model = _tiny_hf_gpt2()
    folder = tmp_path_factory.mktemp("openai") / "124M"
    _write_checkpoint(folder, model)
    return model, folder


def test_openai_checkpoint_matches_transformers(tf_checkpoint, tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    hf_model, folder = tf_checkpoint
    for f in ("checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "hparams.json"):
        assert (folder / f).is_file()
    root = tmp_path / "models"
    assert main(["--models-dir", str(root), "import", str(folder), "--name", "tiny-tf"]) == 0
    manifest, state = store.read("tiny-tf", root)
    assert manifest["source"]["format"] == "openai-tf"
    assert manifest["config"]["qkv_bias"] and manifest["config"]["tie_embeddings"]
    model = GPT(ModelConfig.from_dict(manifest["config"]))
    model.load_state_dict(state, strict=True)
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model.eval()(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4


def test_openai_folder_brings_its_tokenizer(tf_checkpoint, tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    _, folder = tf_checkpoint
    full = tmp_path / "full"
    shutil.copytree(folder, full)
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(gpt2_tokenizer_dir / f, full / f)
    root = tmp_path / "models"
    assert main(["--models-dir", str(root), "import", str(full), "--name", "with-tok"]) == 0
    tok = store.read_manifest("with-tok", root)["tokenizer"]
    assert tok == {"type": "gpt2-bpe", "files": {"encoder_json": "encoder.json", "vocab_bpe": "vocab.bpe"},
                   "eos_token_ids": [50256]}
    assert (store.model_dir("with-tok", root) / "vocab.bpe").read_bytes() == (full / "vocab.bpe").read_bytes()


def test_missing_hparams_is_one_line_and_store_unchanged(tf_checkpoint, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    _, folder = tf_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "hparams.json").unlink()
    root = tmp_path / "models"
    root.mkdir()
    assert main(["--models-dir", str(root), "import", str(broken), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hparams.json is missing" in err and str(broken) in err
    assert list(root.iterdir()) == []


def test_offline_fetch_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    # This machine reaches only package registries, so OpenAI's URL and the mirror both fail.
    monkeypatch.setenv("SCRATCHCHAT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "models"
    root.mkdir()
    start = time.monotonic()
    assert main(["--models-dir", str(root), "fetch", "gpt2-small"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "python -m weights import" in err and "--name gpt2-small" in err
    assert list(root.iterdir()) == []
    assert not list((tmp_path / "cache").rglob("model.ckpt*"))


class _RangeServer:
    """A local stand-in for OpenAI's bucket that honours HTTP Range, and records each request."""

    def __init__(self, files: dict[str, bytes]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in files:
                    self.send_error(404)
                    return
                data, status = files[name], 200
                if rng:
                    data, status = data[int(rng.split("=")[1].split("-")[0]):], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_fetch_downloads_resumes_and_falls_back_to_mirror(tf_checkpoint, tmp_path: Path, gpt2_tokenizer_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from weights import openai_tf

    hf_model, folder = tf_checkpoint
    files = {f.name: f.read_bytes() for f in folder.iterdir()}
    files["checkpoint"] = b'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    files["model.ckpt.meta"] = b"unused graph"
    for f in ("encoder.json", "vocab.bpe"):
        files[f] = (gpt2_tokenizer_dir / f).read_bytes()
    assert sorted(files) == sorted(openai_tf.FILES)
    server = _RangeServer(files)
    try:
        # the "OpenAI" URL refuses connections, so every file must come from the "mirror"
        monkeypatch.setattr(openai_tf, "URLS", ("http://127.0.0.1:9/{size}/{file}",
                                                f"http://127.0.0.1:{server.port}/gpt2/{{size}}/{{file}}"))
        monkeypatch.setenv("SCRATCHCHAT_CACHE", str(tmp_path / "cache"))
        cache = tmp_path / "cache" / "gpt2" / "124M"
        cache.mkdir(parents=True)
        (cache / "hparams.json").write_bytes(files["hparams.json"])  # complete: skipped
        data = "model.ckpt.data-00000-of-00001"
        half = len(files[data]) // 2
        (cache / f"{data}.part").write_bytes(files[data][:half])  # partial: resumed
        root = tmp_path / "models"
        assert main(["--models-dir", str(root), "fetch", "gpt2-small"]) == 0
    finally:
        server.close()
    requested = dict(server.requests)
    assert "hparams.json" not in requested and requested[data] == f"bytes={half}-"
    assert all((cache / f).read_bytes() == files[f] for f in openai_tf.FILES)
    assert not list(cache.glob("*.part"))
    manifest, state = store.read("gpt2-small", root)
    assert manifest["tokenizer"]["type"] == "gpt2-bpe" and manifest["prompt_format"] == "none"
    model = GPT(ModelConfig.from_dict(manifest["config"]))
    model.load_state_dict(state, strict=True)
    idx = torch.arange(10)[None]
    with torch.no_grad():
        assert (model.eval()(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4
