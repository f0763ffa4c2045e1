"""OpenAI's GPT-2 TensorFlow checkpoints: download (tqdm, skip, resume, mirror) and read.

A checkpoint folder holds seven files (Raschka, *Build a Large Language Model (From Scratch)*, ch. 5 and its
``gpt_download.py``): ``checkpoint``, ``encoder.json``, ``hparams.json``, ``model.ckpt.data-00000-of-00001``,
``model.ckpt.index``, ``model.ckpt.meta`` and ``vocab.bpe``. ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head,
n_layer) gives the config; the variables (``model/h0/attn/c_attn/w`` of shape (1, in, out), ``model/ln_f/g``,
``model/wte``, ...) are mapped by :data:`weights.names.OPENAI_TF`: leading singleton dims squeezed, Conv1D
weights transposed, ``c_attn`` split into q/k/v, ``wte`` tied to the head.

TensorFlow is imported lazily inside :func:`read`, with its C++ logs quieted, since nothing else needs it.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from weights.names import OPENAI_TF, apply_table
from weights.store import ImportedModel, gpt2_tokenizer_entry

log = logging.getLogger(__name__)

SIZES = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe")
URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}",
        "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/{size}/{file}")  # OpenAI, then the book's mirror
TIMEOUT_S = 8.0
"""Socket timeout per connect/read: offline, the first file fails within seconds instead of hanging."""


def config_from_hparams(hp: dict[str, Any], source: str) -> dict[str, Any]:
    """Our config dict from OpenAI's hparams.json."""
    try:
        d = int(hp["n_embd"])
        return {
            "vocab_size": int(hp["n_vocab"]), "context_length": int(hp["n_ctx"]), "d_model": d,
            "n_layers": int(hp["n_layer"]), "n_heads": int(hp["n_head"]), "n_kv_heads": int(hp["n_head"]),
            "ffn_dim": 4 * d, "norm": "layernorm", "mlp": "gelu", "pos_emb": "learned", "rope_base": 10000.0,
            "rope_scaling": None, "norm_eps": 1e-5, "bias": True, "qkv_bias": True, "tie_embeddings": True,
            "dropout": 0.0,
        }
    except KeyError as e:
        raise ValueError(f"{source}: key {e} is missing; hparams.json needs n_vocab, n_ctx, n_embd, n_head and "
                         f"n_layer") from None


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    return tf


def _checkpoint_prefix(folder: Path, tf) -> str:
    prefix = tf.train.latest_checkpoint(str(folder))
    if prefix and Path(prefix + ".index").is_file():
        return prefix
    indexes = sorted(folder.glob("*.index"))  # a `checkpoint` file written elsewhere may hold a stale absolute path
    if len(indexes) == 1:
        return str(indexes[0].with_suffix(""))
    raise FileNotFoundError(f"{folder}: no TF checkpoint (model.ckpt.index + model.ckpt.data-*) found; copy OpenAI's "
                            f"seven files into the folder or run `python -m weights fetch gpt2-small`")


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an OpenAI GPT-2 checkpoint folder -> (config dict, canonical state dict)."""
    folder = Path(path)
    hparams = folder / "hparams.json"
    if not hparams.is_file():
        raise FileNotFoundError(f"{folder}: hparams.json is missing; copy it from the same OpenAI GPT-2 download "
                                f"(it holds n_vocab, n_ctx, n_embd, n_head, n_layer) or re-run "
                                f"`python -m weights fetch gpt2-small`")
    try:
        config = config_from_hparams(json.loads(hparams.read_text(encoding="utf-8")), str(hparams))
    except json.JSONDecodeError as e:
        raise ValueError(f"{hparams}: invalid JSON ({e}); re-download hparams.json") from None
    tf = _quiet_tensorflow()
    prefix = _checkpoint_prefix(folder, tf)
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except Exception as e:  # TF raises its own error types for corrupt files
        raise ValueError(f"{prefix}: unreadable TF checkpoint ({' '.join(str(e).split())[:200]}); re-download "
                         f"the model.ckpt.* files") from None
    tensors: dict[str, torch.Tensor] = {}
    for name in shapes:
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        array = reader.get_tensor(name)
        key = name.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
        rank = 2 if key.endswith("/w") or key in ("model/wte", "model/wpe") else 1
        while array.ndim > rank and array.shape[0] == 1:  # OpenAI's Conv1D w is (1, in, out)
            array = array[0]
        tensors[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return config, apply_table(tensors, OPENAI_TF, config, str(folder))


def read_for_import(path: Path) -> ImportedModel:
    """:func:`read` plus encoder.json/vocab.bpe from the same folder (OpenAI ships them with every size)."""
    config, state = read(path)
    tokenizer: dict[str, Any] = {"type": "none"}
    files: dict = {}
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        tokenizer, files = gpt2_tokenizer_entry(path / "encoder.json", path / "vocab.bpe")
    return ImportedModel(config=config, state_dict=state, source={"format": "openai-tf", "path": str(path)},
                         tokenizer=tokenizer, files=files)


class DownloadError(ConnectionError):
    """Neither OpenAI's URL nor the mirror served a file."""


def _offline_hint(model: str, dest: Path) -> str:
    return (f"copy OpenAI's seven files ({', '.join(FILES)}) for {model} from another machine into a folder and run "
            f"`python -m weights import DIR --name {model}` (partial downloads in {dest} resume on the next fetch)")


def download_gpt2(model: str, dest: str | Path) -> Path:
    """Download OpenAI's seven files for ``model`` (gpt2-small..gpt2-xl) into ``dest``.

    Complete files are skipped (a file gets its final name only after its size matched Content-Length), partial
    ones resume with an HTTP Range request from ``<file>.part``, and each file falls back to the book's mirror.

    Raises:
        ValueError: unknown model name. DownloadError: no URL reachable (offline), with the local-import fix.
    """
    from tqdm.auto import tqdm

    if model not in SIZES:
        raise ValueError(f"unknown GPT-2 size {model!r}; choose one of {', '.join(SIZES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    size = SIZES[model]
    for file in FILES:
        target = dest / file
        if target.is_file():
            log.info("file already exists and is up-to-date: %s", target)
            continue
        errors = []
        for template in URLS:
            url = template.format(size=size, file=file)
            try:
                _download(url, target, tqdm)
                break
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url.split('/')[2]}: {getattr(e, 'reason', e)}")
        else:
            raise DownloadError(f"cannot download {file} for {model} ({'; '.join(errors)}); offline? "
                                + _offline_hint(model, dest))
    return dest


def _download(url: str, target: Path, tqdm) -> None:
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "scratchchat"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
        if have and resp.status != 206:  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=target.name) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise ValueError(f"{url}: got {got} bytes, expected {total}")
    os.replace(part, target)
