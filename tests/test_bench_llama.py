"""engine.bench_llama without llama_cpp: skip reasons and parsing of the subprocess's JSON line."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from engine import bench_llama
from engine.bench_llama import llama_cpp_row


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")  # never opened: the interpreters below do not load it
    return path


def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{body}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="this venv has llama_cpp")
def test_interpreter_without_llama_cpp_is_skipped(gguf: Path) -> None:
    row = llama_cpp_row(gguf, threads=1, new_tokens=4, python=sys.executable)
    assert set(row) == {"skipped"}
    assert "cannot import llama_cpp" in row["skipped"]
    assert "No module named 'llama_cpp'" in row["skipped"]
    assert "scripts/bench-llama-env.sh" in row["skipped"]


def test_fake_interpreter_json_is_parsed(tmp_path: Path, gguf: Path) -> None:
    out = {"llama_cpp_version": "9.9.9", "decode_tok_s": [80.0, 90.0, 85.0], "prompt_tok_s": [300.0, 310.0, 290.0]}
    body = ("import sys\nassert sys.argv[2] == " + repr(str(gguf)) + "\nassert '--threads' in sys.argv\n"
            "print('loading...')\nprint(" + repr(json.dumps(out)) + ")")
    python = _fake_python(tmp_path, body)
    row = llama_cpp_row(gguf, threads=2, new_tokens=200, python=python)
    assert row == {"llama_cpp_tok_s": 85.0, "llama_cpp_prompt_tok_s": 300.0, "python": python,
                   "llama_cpp_version": "9.9.9"}


def test_failure_reports_last_stderr_line(tmp_path: Path, gguf: Path) -> None:
    python = _fake_python(tmp_path, "import sys\nsys.stderr.write('noise\\nRuntimeError: boom\\n')\nsys.exit(1)")
    row = llama_cpp_row(gguf, threads=2, new_tokens=8, python=python)
    assert set(row) == {"skipped"}
    assert "exited with code 1: RuntimeError: boom" in row["skipped"]


def test_segfault_is_named(tmp_path: Path, gguf: Path) -> None:
    python = _fake_python(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    row = llama_cpp_row(gguf, threads=2, new_tokens=8, python=python)
    assert "SIGSEGV" in row["skipped"]


def test_no_json_and_timeout_are_skipped(tmp_path: Path, gguf: Path) -> None:
    python = _fake_python(tmp_path, "print('hello')")
    assert "no usable JSON" in llama_cpp_row(gguf, threads=2, new_tokens=8, python=python)["skipped"]
    python = _fake_python(tmp_path, "import time\ntime.sleep(30)")
    assert "timed out" in llama_cpp_row(gguf, threads=2, new_tokens=8, python=python, timeout=0.5)["skipped"]


def test_missing_interpreter_and_gguf(tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCRATCHCHAT_LLAMA_PYTHON", raising=False)
    monkeypatch.setenv("SCRATCHCHAT_LLAMA_VENV", str(tmp_path / "no-venv"))
    assert "scripts/bench-llama-env.sh" in llama_cpp_row(gguf, threads=2, new_tokens=8)["skipped"]
    row = llama_cpp_row(gguf, threads=2, new_tokens=8, python=str(tmp_path / "missing-python"))
    assert "cannot run" in row["skipped"]
    row = llama_cpp_row(tmp_path / "absent.gguf", threads=2, new_tokens=8, python=sys.executable)
    assert "GGUF file not found" in row["skipped"]


def test_env_var_chooses_interpreter(tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = {"decode_tok_s": [1.0], "prompt_tok_s": [2.0]}
    python = _fake_python(tmp_path, "print(" + repr(json.dumps(out)) + ")")
    monkeypatch.setenv("SCRATCHCHAT_LLAMA_PYTHON", python)
    assert llama_cpp_row(gguf, threads=2, new_tokens=8)["python"] == python


def test_module_imports_only_stdlib_at_top_level() -> None:
    tree = ast.parse(Path(bench_llama.__file__).read_text())
    names = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}
