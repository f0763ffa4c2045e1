"""The model store: one folder per model under ``$CHAT_MODELS_DIR`` (default ``<repo>/models``).

Each model folder holds ``model.safetensors`` (our canonical names, tied embeddings stored once), ``model.json`` (the
manifest: name, family, config (``ModelConfig`` fields), tokenizer (``{"type": "gpt2-bpe"|"hf"|"none", "files",
"eos_token_ids", ...}``), prompt_format, dtype on disk, num_parameters, source, sha256, created_from, created_at,
generation defaults, system_prompt) and its tokenizer files; adapters live in ``<model>/adapters/<name>/`` as standard
PEFT folders. Every write is atomic: it goes into a hidden temp folder inside the models dir (same filesystem), is
fsynced, then renamed into place, so an interrupted import leaves nothing that :func:`list_models` would show.
Loading memory-maps the safetensors file (``safetensors.torch.load_file`` uses mmap on CPU).

Weights are stored as float32 by default: GGUF Q4_1/Q8_0 dequantized values (fp16 scale times a small integer plus
an fp16 offset) are exact in float32 but not in bfloat16, and the oracle tests compare against transformers in
float32. ``dtype="bfloat16"`` halves the size on disk when exactness does not matter; either way the engine picks
its compute dtype at load time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weights.names import check_state_dict

log = logging.getLogger(__name__)

MODELS_ENV = "CHAT_MODELS_DIR"
MANIFEST = "model.json"
WEIGHTS = "model.safetensors"
PROMPT_FORMATS = ("alpaca", "phi3", "chatml", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0


@dataclass
class ImportedModel:
    """What a format reader hands to :func:`add_model`: plain data, canonical names."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    source: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    files: dict[str, Path | bytes] = field(default_factory=dict)
    """Extra files (tokenizer) to write into the model folder: destination name -> source path or content."""
    prompt_format: str | None = None
    """The format the checkpoint suggests (e.g. chatml from a chat template), used when the user names none."""


def models_dir() -> Path:
    """``$CHAT_MODELS_DIR``, else ``models/`` at the repository root (so it does not depend on the cwd)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1] / "models"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser().resolve() if root is not None else models_dir()


def check_name(name: str) -> str:
    """Model and adapter names become folder names: letters, digits, ``.``, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' (e.g. gpt2-small)")
    return name


def model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of model ``name`` (it may not exist yet)."""
    return _root(root) / check_name(name)


def adapter_dir(base: str, adapter: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of adapter ``adapter`` of base model ``base`` (it may not exist yet)."""
    return model_dir(base, root) / "adapters" / check_name(adapter)


def read_manifest(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest (model.json) of ``name``; FileNotFoundError lists the known models."""
    path = model_dir(name, root) / MANIFEST
    if not path.is_file():
        known = ", ".join(m["name"] for m in list_models(root)) or "none"
        raise FileNotFoundError(f"no model {name!r} in {_root(root)} (known: {known}); add one with "
                                f"`python -m weights fetch NAME` or `python -m weights import PATH --name NAME`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); re-import the model or restore the file") from None


def list_models(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Manifests of every complete model in the store, sorted by name (temp folders are invisible)."""
    base = _root(root)
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.iterdir()):
        if d.name.startswith(".") or not (d / MANIFEST).is_file():
            continue
        try:
            out.append(json.loads((d / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: unreadable manifest (%s)", d, e)
    return out


def list_adapters(base: str, root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Adapters of ``base``: each dict is its scratchchat.json plus ``name`` and ``path``, sorted by name."""
    folder = model_dir(base, root) / "adapters"
    if not folder.is_dir():
        return []
    out = []
    for d in sorted(folder.iterdir()):
        if d.name.startswith(".") or not (d / "adapter_config.json").is_file():
            continue
        meta_path = d / "scratchchat.json"
        meta = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                log.warning("adapter %s: unreadable scratchchat.json (%s)", d, e)
        out.append({**meta, "name": d.name, "path": str(d)})
    return out


def read(name: str, root: str | os.PathLike | None = None, *,
         dtype: str | torch.dtype | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a model: ``(manifest, state_dict)`` with the tensors memory-mapped from model.safetensors.

    Args:
        dtype: cast floating tensors to this dtype (copies them out of the mmap); None keeps the dtype on disk.

    Raises:
        FileNotFoundError: no such model. ValueError: the file is truncated, corrupt or does not fit the config.
    """
    manifest = read_manifest(name, root)
    path = model_dir(name, root) / WEIGHTS
    state = load_safetensors(path, fix=f"re-import it with `python -m weights import PATH --name {name}`")
    check_state_dict(state, manifest["config"], str(path))
    if dtype is not None:
        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    return manifest, state


def load_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` (mmap) with a one-line error naming the file and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; {fix}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({detail}); {fix}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for fn in filenames:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _clean_stale(parent: Path) -> None:
    now = time.time()
    for d in parent.glob(f"{_TMP_PREFIX}*"):
        try:
            if now - d.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temp folder next to ``final``; on success fsync it and rename it to ``final``.

    On any exception (including KeyboardInterrupt) the temp folder is removed and ``final`` is untouched.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pick another name or remove it first")
    _clean_stale(parent)
    tmp = parent / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # overwrite: move the old one aside first, then swap
            old = parent / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def add_model(
    name: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    tokenizer: Mapping[str, Any] | None = None,
    files: Mapping[str, Path | bytes] | None = None,
    prompt_format: str = "none",
    dtype: str = "float32",
    source: Any = None,
    created_from: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a model into the store atomically and return its manifest.

    Args:
        name: folder name of the new model.
        config: ModelConfig.to_dict()-style dict; the state dict is checked against it first.
        state_dict: canonical names (tied head absent, so the embedding is stored once).
        tokenizer: the manifest's tokenizer dict ({"type": "none"} when omitted).
        files: extra files for the folder (tokenizer): destination name -> source path or bytes.
        prompt_format: one of alpaca, phi3, chatml, none.
        dtype: float32 or bfloat16 on disk.
        source, created_from, generation, system_prompt: recorded in the manifest as given.
        overwrite: replace an existing model of that name (atomically).
    """
    from safetensors.torch import save_file

    check_name(name)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose float32 or bfloat16")
    config = dict(config)
    check_state_dict(state_dict, config, f"model {name!r}")
    final = model_dir(name, root)
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
               for k, v in state_dict.items()}
    with atomic_dir(final, overwrite=overwrite) as tmp:
        for dest, src in (files or {}).items():
            target = tmp / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes | bytearray):
                target.write_bytes(src)
            else:
                shutil.copyfile(src, target)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, 0o644)  # safetensors creates it owner-only; the store is shared like any data dir
        manifest = {
            "name": name,
            "family": "gpt2" if config.get("pos_emb", "learned") == "learned" else "llama",
            "config": config,
            "tokenizer": dict(tokenizer or {"type": "none"}),
            "prompt_format": prompt_format,
            "dtype": dtype,
            "num_parameters": sum(v.numel() for v in tensors.values()),
            "source": source,
            "sha256": sha256_file(tmp / WEIGHTS),
            "created_from": dict(created_from) if created_from else None,
            "created_at": _now(),
            "generation": dict(generation or {}),
            "system_prompt": system_prompt,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("added model %s to %s", name, final.parent)
    return manifest


def remove_model(name: str, root: str | os.PathLike | None = None) -> None:
    """Delete a model folder (renamed out of sight first, so a crash never leaves half of it listed)."""
    final = model_dir(name, root)
    if not final.is_dir():
        raise FileNotFoundError(f"no model {name!r} in {final.parent}")
    trash = final.parent / f"{_TMP_PREFIX}del-{name}-{uuid.uuid4().hex[:8]}"
    os.rename(final, trash)
    shutil.rmtree(trash, ignore_errors=True)


def detect_format(path: Path) -> str:
    """``"gguf"``, ``"hf"`` or ``"openai-tf"`` for a file or folder; ValueError says what was expected."""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        if path.suffix == ".safetensors" or path.name == "model.safetensors.index.json":
            return "hf"
        raise ValueError(f"{path}: not a GGUF or safetensors file; pass a .gguf, a .safetensors, an HF folder "
                         f"with config.json or an OpenAI GPT-2 checkpoint folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors"))
                                            or (path / "model.safetensors.index.json").is_file()):
        return "hf"
    if any((path / n).exists() for n in ("checkpoint", "model.ckpt.index", "hparams.json")) or \
            any(path.glob("*.ckpt.index")):
        return "openai-tf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise ValueError(f"{path}: found no model files; expected an HF folder (config.json + *.safetensors), an "
                     f"OpenAI GPT-2 checkpoint folder (checkpoint, model.ckpt.*, hparams.json) or one .gguf file")


def import_path(path: str | os.PathLike, name: str, prompt_format: str | None = None,
                root: str | os.PathLike | None = None, *, dtype: str = "float32",
                tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
                generation: Mapping[str, Any] | None = None, system_prompt: str | None = None,
                source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Import a checkpoint (auto-detected: OpenAI TF folder, HF safetensors file/folder, GGUF) into the store.

    Args:
        path: the file or folder.
        name: the new model's name.
        prompt_format: alpaca, phi3, chatml or none; None takes the checkpoint's hint (chatml for a ChatML chat
            template) or "none".
        dtype: float32 (default, exact) or bfloat16 on disk.
        tokenizer_dir: a folder with encoder.json + vocab.bpe (GPT-2 BPE) or tokenizer.json (HF), used when the
            checkpoint carries no tokenizer of its own.
        source: extra provenance merged into the manifest's ``source``.

    Returns:
        the new manifest.
    """
    p = Path(path).expanduser().resolve()
    check_name(name)
    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    if model_dir(name, root).exists() and not overwrite:
        raise FileExistsError(f"model {name!r} already exists in {_root(root)}; pick another --name")
    fmt = detect_format(p)
    if fmt == "gguf":
        from weights import gguf

        imported = gguf.read_for_import(p)
    elif fmt == "hf":
        from weights import hf

        imported = hf.read_for_import(p)
    else:
        from weights import openai_tf

        imported = openai_tf.read_for_import(p)
    if tokenizer_dir is not None:
        imported.tokenizer, imported.files = read_tokenizer_dir(Path(tokenizer_dir).expanduser().resolve(),
                                                                imported.config)
    return add_model(
        name, imported.config, imported.state_dict, tokenizer=imported.tokenizer, files=imported.files,
        prompt_format=prompt_format or imported.prompt_format or "none", dtype=dtype,
        source={**imported.source, **(source or {})}, generation=generation, system_prompt=system_prompt,
        root=root, overwrite=overwrite,
    )


def read_tokenizer_dir(folder: Path, config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Path | bytes]]:
    """Tokenizer dict + files from a folder: encoder.json + vocab.bpe (GPT-2 BPE) or tokenizer.json (HF)."""
    if (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file():
        return gpt2_tokenizer_entry(folder / "encoder.json", folder / "vocab.bpe")
    if (folder / "tokenizer.json").is_file():
        from weights import hf

        return hf.hf_tokenizer_entry(folder)
    raise FileNotFoundError(f"{folder}: no tokenizer files; expected encoder.json + vocab.bpe (GPT-2) or "
                            f"tokenizer.json (HF) there")


def gpt2_tokenizer_entry(encoder_json: Path | bytes, vocab_bpe: Path | bytes) -> tuple[dict[str, Any], dict]:
    """The manifest tokenizer dict and files for OpenAI's GPT-2 BPE (``<|endoftext|>`` = 50256 is the EOS)."""
    tokenizer = {"type": "gpt2-bpe", "files": {"encoder_json": "encoder.json", "vocab_bpe": "vocab.bpe"},
                 "eos_token_ids": [50256]}
    return tokenizer, {"encoder.json": encoder_json, "vocab.bpe": vocab_bpe}
