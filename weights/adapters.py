"""LoRA adapters as standard PEFT folders: read, validate against their base, and add to the store atomically.

A folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as ``peft``'s ``save_pretrained``
writes them for our GPT (verified with ``peft.get_peft_model(GPT(config), LoraConfig(target_modules=[...]))``):
keys ``base_model.model.blocks.{i}.attn.q_proj.lora_A.weight`` of shape (r, in) and ``...lora_B.weight`` of shape
(out, r). The store adds ``scratchchat.json`` ({"base", "base_sha256", "created_at", ...}) so an adapter is never
applied to a base it was not trained on. The update is ``W x + scaling * B (A x)`` with ``scaling = lora_alpha / r``,
or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023); the engine applies it, this module only reads.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from weights import store

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
META = "scratchchat.json"
PROJECTIONS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn", "gate_proj": "mlp",
               "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^base_model\.model\.blocks\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")

AdapterKey = tuple[int, str, str]  # (layer, projection, "A" | "B")


def proj_shape(config: Mapping[str, Any], proj: str) -> tuple[int, int]:
    """(out, in) of a projection's weight for a config dict."""
    d, f = config["d_model"], config["ffn_dim"]
    kv = config["n_kv_heads"] * (d // config["n_heads"])
    return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d), "gate_proj": (f, d),
            "up_proj": (f, d), "down_proj": (d, f)}[proj]


def _pattern_value(patterns: Mapping[str, Any], layer: int, proj: str, default: Any) -> Any:
    # PEFT matches rank/alpha pattern keys as regexes against the end of the module name
    name = f"blocks.{layer}.{PROJECTIONS[proj]}.{proj}"
    for key, value in patterns.items():
        if re.search(rf"(^|\.){key}$", name):
            return value
    return default


def read_adapter(path: str | os.PathLike, base_config: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, Any], dict[AdapterKey, torch.Tensor]]:
    """Read a PEFT LoRA folder -> (config, tensors keyed by (layer, proj, "A"|"B")).

    The returned config has ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ``scaling`` (the default) and
    ``scalings`` ({(layer, proj): scaling} for every adapted projection, honouring rank/alpha patterns).

    Args:
        base_config: the base model's config dict; when given, every tensor's shape is checked against it.

    Raises:
        ValueError/FileNotFoundError: a one-line message naming the file and the problem.
    """
    folder = Path(path)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG}; an adapter folder is what peft's save_pretrained writes")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e}); re-save the adapter") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not supported; only LORA")
    for flag in ("use_dora", "lora_bias"):
        if raw.get(flag):
            raise ValueError(f"{cfg_path}: {flag}=true is not supported; train a plain LoRA adapter")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: trained biases or modules_to_save are not supported; use bias='none'")
    r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    use_rslora = bool(raw.get("use_rslora", False))

    def scale(rank: int, a: float) -> float:
        return a / math.sqrt(rank) if use_rslora else a / rank

    tensors_raw = store.load_safetensors(folder / WEIGHTS, fix="re-save the adapter with save_pretrained")
    tensors: dict[AdapterKey, torch.Tensor] = {}
    for key, t in tensors_raw.items():
        m = _KEY.match(key)
        if not m or m.group(3) not in PROJECTIONS or PROJECTIONS[m.group(3)] != m.group(2):
            raise ValueError(f"{folder / WEIGHTS}: unexpected tensor {key}; only LoRA on "
                             f"blocks.N.attn.{{q,k,v,o}}_proj and blocks.N.mlp.{{gate,up,down}}_proj is supported")
        tensors[(int(m.group(1)), m.group(3), m.group(4))] = t
    pairs = {(layer, proj) for layer, proj, _ in tensors}
    scalings = {}
    for layer, proj in sorted(pairs):
        for ab in "AB":
            if (layer, proj, ab) not in tensors:
                raise ValueError(f"{folder / WEIGHTS}: lora_{ab} of blocks.{layer} {proj} is missing; re-save the "
                                 f"adapter")
        rank = int(tensors[(layer, proj, "A")].shape[0])
        scalings[(layer, proj)] = scale(rank, float(_pattern_value(raw.get("alpha_pattern") or {}, layer, proj,
                                                                   alpha)))
        if base_config is not None:
            _check_pair(folder / WEIGHTS, base_config, layer, proj, tensors[(layer, proj, "A")],
                        tensors[(layer, proj, "B")])
    targets = raw.get("target_modules")
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets) if isinstance(targets, list) else targets,
              "use_rslora": use_rslora, "scaling": scale(r, alpha), "scalings": scalings}
    return config, tensors


def _check_pair(source: Path, config: Mapping[str, Any], layer: int, proj: str, a: torch.Tensor,
                b: torch.Tensor) -> None:
    if layer >= config["n_layers"]:
        raise ValueError(f"{source}: adapter has layer {layer} but the base has {config['n_layers']} layers; it was "
                         f"trained on another model")
    out, inp = proj_shape(config, proj)
    rank = a.shape[0]
    for which, t, want in (("A", a, (rank, inp)), ("B", b, (out, rank))):
        if tuple(t.shape) != want:
            raise ValueError(f"{source}: blocks.{layer} {proj} lora_{which} has shape {tuple(t.shape)} but the base "
                             f"expects {want}; the adapter was trained on another model")


def validate(path: str | os.PathLike, base_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Check an adapter folder against its base (scratchchat.json name + sha256, tensor shapes); returns the meta."""
    meta = _check_meta(Path(path), base_manifest)
    read_adapter(path, base_manifest["config"])
    return meta


def _check_meta(folder: Path, base_manifest: Mapping[str, Any]) -> dict[str, Any]:
    meta_path = folder / META
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("base") not in (None, base_manifest["name"]):
            raise ValueError(f"{meta_path}: adapter was trained on {meta['base']!r}, not {base_manifest['name']!r}; "
                             f"pick the matching base model")
        if meta.get("base_sha256") not in (None, base_manifest.get("sha256")):
            raise ValueError(f"{meta_path}: base {base_manifest['name']!r} has changed since the adapter was trained "
                             f"(sha256 differs); retrain the adapter or restore the original base")
    return meta


def write_adapter_meta(folder: str | os.PathLike, base_manifest: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Write scratchchat.json (base name + sha256 + created_at + extra) atomically (temp file + rename)."""
    folder = Path(folder)
    meta = {"base": base_manifest["name"], "base_sha256": base_manifest.get("sha256"), "created_at": store._now(),
            **extra}
    tmp = folder / f".{META}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / META)
    return meta


def add_adapter(base: str, name: str, src: str | os.PathLike, root: str | os.PathLike | None = None, *,
                overwrite: bool = False, **meta: Any) -> dict[str, Any]:
    """Copy a PEFT folder into ``<store>/<base>/adapters/<name>/`` atomically, after validating it against the base.

    Extra keyword arguments are recorded in scratchchat.json (e.g. prompt_format, dataset, epochs).
    """
    base_manifest = store.read_manifest(base, root)
    src = Path(src)
    validate(src, base_manifest)
    final = store.adapter_dir(base, name, root)
    with store.atomic_dir(final, overwrite=overwrite) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != META and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        written = write_adapter_meta(tmp, base_manifest, **meta)
    return {**written, "name": name, "path": str(final)}


def read(base: str, name: str, root: str | os.PathLike | None = None
         ) -> tuple[dict[str, Any], dict[AdapterKey, torch.Tensor]]:
    """Read a stored adapter of ``base`` after validating it (name, sha256, shapes)."""
    folder = store.adapter_dir(base, name, root)
    if not folder.is_dir():
        known = ", ".join(a["name"] for a in store.list_adapters(base, root)) or "none"
        raise FileNotFoundError(f"no adapter {name!r} for {base!r} (known: {known}); train one with "
                                f"`python -m finetune lora`")
    base_manifest = store.read_manifest(base, root)
    _check_meta(folder, base_manifest)
    return read_adapter(folder, base_manifest["config"])
