"""Loaded base models (an LRU under a memory cap) and their LoRA adapters, built from the model store.

A base is loaded once: ``weights.store.read`` gives the manifest and a state dict in our canonical names, the
engine builds :class:`~engine.model.GPT` from the manifest's config and loads it with ``strict=True`` (missing,
unexpected or mis-shaped tensors are a :class:`~engine.errors.ModelLoadError` naming them). Weights are cast to
the serving dtype at load: bf16 where the CPU has native bf16 matmuls (AMX / AVX512-BF16), else fp32; the
``SCRATCHCHAT_DTYPE`` environment variable (``float32`` | ``bfloat16`` | ``auto``) overrides it. With
``SCRATCHCHAT_QUANT=int8`` the base is also quantized to int8 weight-only for decode steps (:mod:`engine.quant`).
Then each kind of projection gets the decode kernel that measured fastest on this CPU for one row and for a few
rows: ours (:mod:`engine.kernels`), PyTorch's plain GEMV/GEMM, or MKL's/oneDNN's on a packed copy
(:mod:`engine.prepack`; ``SCRATCHCHAT_PACK=off`` keeps PyTorch's plain kernels only).

Adapters are loaded next to their base (never merged unless asked) and versioned by the sha256 of their weights
file; a changed file on disk is reloaded on next use, so a finetune run that overwrites an adapter takes effect
without a restart. Listing always re-reads the store, so models that appear while the engine runs show up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import AdapterMismatch, ModelLoadError, UnknownModel
from engine.lora import ADAPTER_WEIGHTS, LoraAdapter, MergedAdapter, load_adapter, merge_adapter
from engine.model import GPT, build_rope_cache
from engine.prepack import PACK_MODES, default_pack, prepack_
from engine.prompts import PromptFormat, get_prompt_format
from engine.quant import default_quant, quant_supported, quantize_int8_
from engine.threads import run_in_fresh_thread
from engine.tokenizer import Tokenizer, load_tokenizer
from weights import store

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_CAP = 8 << 30  # bytes of base-model weights kept loaded at once
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_dtype() -> torch.dtype:
    """The serving dtype: ``$SCRATCHCHAT_DTYPE`` if set, else bf16 when the CPU has fast bf16, else fp32."""
    want = os.environ.get("SCRATCHCHAT_DTYPE", "auto").lower()
    if want != "auto":
        if want not in DTYPES:
            raise ValueError(f"SCRATCHCHAT_DTYPE={want!r}; use one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[want]
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 and torch.backends.mkldnn.is_available() else torch.float32


@dataclass
class LoadedModel:
    """A base model ready to serve, with its tokenizer, prompt format and loaded adapters."""

    name: str
    manifest: dict[str, Any]
    config: ModelConfig
    model: GPT
    tokenizer: Tokenizer
    prompt_format: PromptFormat
    dtype: torch.dtype
    sha256: str
    nbytes: int
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)
    merged: MergedAdapter | None = None
    # (size, mtime_ns) of each adapter's weights file when it was loaded, to notice files rewritten on disk
    adapter_stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    stamp: tuple[int, int] = (0, 0)  # model.json's (mtime_ns, inode) when loaded
    quant: str = "none"  # "int8": weight-only int8 for batch-1 decode (engine.quant)

    @property
    def family(self) -> str:
        return self.manifest.get("family") or self.config.family


class Registry:
    """Loads base models on demand and keeps the most recently used ones under ``memory_cap`` bytes.

    Args:
        root: models dir (default: ``weights.store.models_dir()``, i.e. ``$CHAT_MODELS_DIR`` or ./models).
        memory_cap: bytes of base weights (with their packed decode copies) to keep loaded
            (``$SCRATCHCHAT_MODEL_MEMORY`` or 8 GiB). The least recently used base that is not busy is evicted to
            make room; a busy one is kept even over the cap. A base gets packed copies only within the cap.
        dtype: serving dtype (default :func:`default_dtype`).
        quant: ``"none"`` or ``"int8"`` (default ``$SCRATCHCHAT_QUANT``, else none); int8 needs our kernels or bf16.
        pack: ``"auto"`` (measure and keep faster packed decode weights), ``"off"``, or ``"scratch"`` /
            ``"panel"`` / ``"mkl"`` / ``"onednn"`` to force a kernel (default ``$SCRATCHCHAT_PACK``, else auto).
    """

    def __init__(self, root: str | Path | None = None, *, memory_cap: int | None = None,
                 dtype: torch.dtype | None = None, quant: str | None = None, pack: str | None = None) -> None:
        self._root = Path(root) if root is not None else None
        cap_env = os.environ.get("SCRATCHCHAT_MODEL_MEMORY")
        self.memory_cap = memory_cap if memory_cap is not None else int(cap_env) if cap_env else DEFAULT_MEMORY_CAP
        self.dtype = dtype or default_dtype()
        self.quant = quant or default_quant()
        self.pack = pack or default_pack()
        if self.pack not in PACK_MODES:
            raise ValueError(f"pack must be one of {list(PACK_MODES)}, got {self.pack!r}")
        if self.quant == "int8" and not quant_supported(self.dtype):
            raise ValueError(f"int8 weight-only quantization needs bf16 serving or our AVX2 kernels, not {self.dtype} "
                             "(set SCRATCHCHAT_DTYPE=bf16 or SCRATCHCHAT_QUANT=none)")
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.is_busy: Callable[[str], bool] = lambda name: False  # set by the engine (scheduler.is_busy)
        self.on_evict: Callable[[str], None] = lambda name: None  # set by the engine (scheduler.release)

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else store.models_dir()

    # ---- the store
    def list_models(self) -> list[dict[str, Any]]:
        """Manifests of every model in the store (re-read on each call)."""
        return store.list_models(self.root)

    def read_manifest(self, name: str) -> dict[str, Any]:
        """The manifest of ``name``; UnknownModel when there is no such model, ModelLoadError when unreadable."""
        try:
            store.check_name(name)
            return store.read_manifest(name, self.root)
        except FileNotFoundError as e:
            raise UnknownModel(str(e)) from e
        except ValueError as e:
            if isinstance(e.__cause__, FileNotFoundError) or "invalid name" in str(e):
                raise UnknownModel(f"no model named {name!r}: {e}") from e
            raise ModelLoadError(f"could not read model {name!r}: {e}") from e

    def list_adapters(self, base: str) -> list[str]:
        """Names of the adapters stored for ``base`` (re-read on each call)."""
        try:
            return sorted(e["name"] for e in store.list_adapters(base, self.root))
        except (FileNotFoundError, ValueError):
            return []

    # ---- bases
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def get(self, name: str) -> LoadedModel:
        """The loaded base ``name``, loading it (and evicting others) if needed."""
        with self._lock:
            lm = self._loaded.get(name)
            if lm is not None and lm.stamp == self._stamp(name):
                self._loaded.move_to_end(name)
                return lm
            if lm is not None:  # re-imported on disk: load the new files (running requests finish on the old)
                logger.info("model %s changed on disk; reloading it", name)
                del self._loaded[name]
            load_lock = self._load_locks.setdefault(name, threading.Lock())
        with load_lock:  # one loader per name; other names load concurrently
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
            # in a thread that exits: the OpenMP team it starts must not outlive it (see engine.threads)
            lm = run_in_fresh_thread(lambda: self._load(name), "scratchchat-load")
            with self._lock:
                self._loaded[name] = lm
                self._evict(keep=name)
            return lm

    def _stamp(self, name: str) -> tuple[int, int]:
        """(mtime_ns, inode) of model.json: an atomic re-import replaces the file, so either changes."""
        try:
            st = (store.model_dir(name, self.root) / "model.json").stat()
        except (OSError, ValueError):
            return (0, 0)
        return (st.st_mtime_ns, st.st_ino)

    def unload(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is not None:
                self.on_evict(name)

    def _evict(self, keep: str) -> None:
        total = sum(m.nbytes for m in self._loaded.values())
        for other in list(self._loaded):
            if total <= self.memory_cap:
                break
            if other == keep or self.is_busy(other):
                continue
            total -= self._loaded.pop(other).nbytes
            self.on_evict(other)
            logger.info("evicted %s from memory (cap %d bytes)", other, self.memory_cap)
        if total > self.memory_cap:
            logger.warning("loaded models use %d bytes, over the cap of %d (the others are busy)", total,
                           self.memory_cap)

    def _load(self, name: str) -> LoadedModel:
        stamp = self._stamp(name)
        manifest = self.read_manifest(name)
        t0 = time.perf_counter()
        try:
            manifest, state = store.read(name, self.root)
            config = ModelConfig.from_dict(manifest["config"])
            with torch.device("meta"):  # no random init: every parameter comes from the file
                model = GPT(config)
            model = model.to_empty(device="cpu").to(self.dtype)
            model.load_state_dict(state, strict=True)  # copies (and casts) into our own, writable tensors
            del state
            if config.pos_emb == "rope":  # non-persistent angle tables, rebuilt in float32
                model.rope_cos, model.rope_sin = build_rope_cache(config)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if self.quant == "int8":
                quantize_int8_(model)
            prepack_(model, self.pack, self._copy_budget(model))
            tokenizer = load_tokenizer(store.model_dir(name, self.root), manifest.get("tokenizer") or {"type": "none"})
            fmt = get_prompt_format(manifest.get("prompt_format") or "none")
        except UnknownModel:
            raise
        except Exception as e:  # any failure to build the model is reported as one readable error
            raise ModelLoadError(f"could not load model {name!r}: {type(e).__name__}: {e}") from e
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + model.__dict__.get("packed_bytes", 0)
        logger.info("loaded %s (%s, %.1f MB) in %.2f s", name, self.dtype, nbytes / 2**20, time.perf_counter() - t0)
        return LoadedModel(name=name, manifest=manifest, config=config, model=model, tokenizer=tokenizer,
                           prompt_format=fmt, dtype=self.dtype, sha256=manifest.get("sha256") or "", nbytes=nbytes,
                           stamp=stamp, quant=self.quant)

    def _copy_budget(self, model: torch.nn.Module) -> int:
        """Bytes of packed decode copies a model may add: what the memory cap leaves beside its own weights (a
        float32 model's panel copies would double it)."""
        return max(0, self.memory_cap - sum(p.numel() * p.element_size() for p in model.parameters()))

    # ---- adapters
    def get_adapter(self, base: str | LoadedModel, adapter: str) -> LoraAdapter:
        """The adapter loaded next to ``base``; loaded on first use and reloaded when its file changed.

        Raises:
            UnknownModel: no such adapter folder for this base.
            AdapterMismatch: the adapter was trained for another base or its shapes do not fit.
        """
        lm = base if isinstance(base, LoadedModel) else self.get(base)
        folder = self._adapter_dir(lm.name, adapter)
        w = folder / ADAPTER_WEIGHTS
        try:
            st = w.stat()
        except FileNotFoundError as e:
            known = ", ".join(self.list_adapters(lm.name)) or "none"
            raise UnknownModel(f"no adapter {adapter!r} for base {lm.name!r} (available: {known})") from e
        stat = (st.st_size, st.st_mtime_ns)
        have = lm.adapters.get(adapter)
        if have is not None and lm.adapter_stats.get(adapter) == stat:
            return have
        # read outside the model's lock: the scheduler holds it during every forward pass
        try:
            loaded = run_in_fresh_thread(lambda: load_adapter(folder, lm.config, name=adapter, base_name=lm.name,
                                                              base_sha256=lm.sha256 or None, dtype=lm.dtype),
                                         "scratchchat-adapter")
        except AdapterMismatch:
            raise
        except Exception as e:  # unreadable JSON or safetensors: one readable error, the engine keeps serving
            raise AdapterMismatch(f"could not load adapter {adapter!r} for {lm.name!r}: {e}") from e
        with lm.lock:
            if have is not None and lm.merged is not None and lm.merged.adapter.key == have.key:
                self.unmerge(lm)
            lm.adapters[adapter] = loaded
            lm.adapter_stats[adapter] = stat
        return loaded

    def _adapter_dir(self, base: str, adapter: str) -> Path:
        if not adapter or "/" in adapter or "\\" in adapter or adapter in (".", ".."):
            raise UnknownModel(f"invalid adapter name {adapter!r}")
        return store.adapter_dir(base, adapter, self.root)

    def unload_adapter(self, base: str, adapter: str) -> None:
        with self._lock:
            lm = self._loaded.get(base)
        if lm is None:
            return
        with lm.lock:
            if lm.merged is not None and lm.merged.adapter.name == adapter:
                self.unmerge(lm)
            lm.adapters.pop(adapter, None)
            lm.adapter_stats.pop(adapter, None)

    def merge(self, base: str, adapter: str) -> None:
        """Fold ``adapter`` into ``base``'s weights (fastest for that adapter; other rows subtract it)."""
        lm = self.get(base)
        ad = self.get_adapter(lm, adapter)
        with lm.lock:
            if lm.merged is not None:
                if lm.merged.adapter.key == ad.key:
                    return
                self.unmerge(lm)
            lm.merged = run_in_fresh_thread(lambda: self._merge_now(lm, ad), "scratchchat-merge")

    def unmerge(self, base: str | LoadedModel) -> None:
        lm = base if isinstance(base, LoadedModel) else self._loaded.get(base)
        if lm is None:
            return
        with lm.lock:
            if lm.merged is not None:
                run_in_fresh_thread(lambda: self._unmerge_now(lm), "scratchchat-merge")
                lm.merged = None

    def _merge_now(self, lm: LoadedModel, ad: LoraAdapter) -> MergedAdapter:
        merged = merge_adapter(lm.model, ad)
        self._requantize(lm)
        return merged

    def _unmerge_now(self, lm: LoadedModel) -> None:
        lm.merged.unmerge()
        self._requantize(lm)

    def _requantize(self, lm: LoadedModel) -> None:
        """New int8 and packed copies of weights a merge or unmerge changed (the old ones are stale)."""
        if lm.quant == "int8":  # the merged weights need int8 copies (on the int8 grid) of their own
            quantize_int8_(lm.model)
        if self.pack != "off":
            prepack_(lm.model, self.pack, self._copy_budget(lm.model))
