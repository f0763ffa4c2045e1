"""The llama.cpp peer row of ``python -m engine bench``, measured in a separate venv.

llama-cpp-python is a benchmark peer, never a dependency: it lives in its own venv (made by
``scripts/bench-llama-env.sh``, default ``~/.cache/scratchchat/llama-venv``), and :func:`llama_cpp_row` runs this very
file as a script under that venv's interpreter, then parses the one JSON line it prints. That is why this module
imports only the standard library at top level: the other venv has neither torch nor any of our packages. The script
part loads the GGUF with ``n_threads = n_threads_batch = threads``, greedy-decodes ``new_tokens`` tokens after a
50-token prompt and times the evaluation of a 500-token prompt, a warm-up then ``repeats`` times. llama.cpp's default
native build segfaults in its first evaluation on our KVM guests unless its extra weight buffer types are turned off
(``use_extra_bufts = False``), which costs it its repacked/AMX kernels, so its prompt figure is below its best.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETUP_HINT = ("create the llama.cpp bench venv with scripts/bench-llama-env.sh, "
              "or set SCRATCHCHAT_LLAMA_PYTHON to a python that imports llama_cpp")
DECODE_PROMPT_TOKENS = 50
PP_PROMPT_TOKENS = 500
_TEXT = ("A lighthouse keeper kept a log of every ship that passed the point, the weather at dawn and dusk, and the "
         "number of gulls on the rocks. Over forty years the pages filled three shelves, and a historian later used "
         "them to trace how trade along the coast rose and fell with the seasons and the wars. ")


def default_venv() -> Path:
    """``$SCRATCHCHAT_LLAMA_VENV``, else ``~/.cache/scratchchat/llama-venv`` (where the setup script puts it)."""
    env = os.environ.get("SCRATCHCHAT_LLAMA_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scratchchat" / "llama-venv"


def default_python() -> str | None:
    """``$SCRATCHCHAT_LLAMA_PYTHON``, else the bench venv's python if it exists, else None."""
    env = os.environ.get("SCRATCHCHAT_LLAMA_PYTHON")
    if env:
        return env
    candidate = default_venv() / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _failure(python: str, proc: subprocess.CompletedProcess[str]) -> str:
    last = _last_line(proc.stderr) or _last_line(proc.stdout) or "no output"
    if "No module named 'llama_cpp'" in last or "No module named llama_cpp" in last:
        return f"{python} cannot import llama_cpp ({last}); {SETUP_HINT}"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"llama.cpp peer under {python} was killed by {name} (last stderr line: {last})"
    return f"llama.cpp peer under {python} exited with code {proc.returncode}: {last}"


def llama_cpp_row(gguf_path: Path, threads: int, new_tokens: int, python: str | None = None, *, repeats: int = 3,
                  timeout: float = 600.0) -> dict[str, Any]:
    """Decode and prompt-processing tokens/s of llama.cpp on ``gguf_path``, measured in a subprocess under ``python``.

    Returns ``{"llama_cpp_tok_s", "llama_cpp_prompt_tok_s", "python", "llama_cpp_version"}`` (medians of ``repeats``
    runs), or ``{"skipped": reason}`` when there is no interpreter with llama_cpp or the subprocess fails; it never
    raises for those, so the other bench figures survive.
    """
    python = python or default_python()
    if not python:
        return {"skipped": f"no llama.cpp interpreter (no SCRATCHCHAT_LLAMA_PYTHON, no {default_venv()}/bin/python); "
                           f"{SETUP_HINT}"}
    if not Path(gguf_path).is_file():
        return {"skipped": f"GGUF file not found: {gguf_path}"}
    cmd = [python, str(Path(__file__).resolve()), str(gguf_path), "--threads", str(threads),
           "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"llama.cpp peer under {python} timed out after {timeout:.0f} s"}
    except OSError as e:
        return {"skipped": f"cannot run {python} ({type(e).__name__}: {e}); {SETUP_HINT}"}
    if proc.returncode != 0:
        return {"skipped": _failure(python, proc)}
    lines = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("{")]
    try:
        res = json.loads(lines[-1])
        row = {"llama_cpp_tok_s": statistics.median(res["decode_tok_s"]),
               "llama_cpp_prompt_tok_s": statistics.median(res["prompt_tok_s"]), "python": python}
    except (IndexError, ValueError, KeyError, TypeError, statistics.StatisticsError) as e:
        last = _last_line(proc.stdout) or "no output"
        return {"skipped": f"llama.cpp peer under {python} printed no usable JSON ({type(e).__name__}; last line: "
                           f"{last[:200]})"}
    if res.get("llama_cpp_version"):
        row["llama_cpp_version"] = res["llama_cpp_version"]
    return row


# ---- script part: runs in the llama.cpp venv (stdlib + llama_cpp only) ----


def _disable_extra_bufts() -> bool:
    """Make ``Llama`` load models with ``use_extra_bufts = False`` (the native build segfaults here otherwise).

    ``Llama.__init__`` takes its model params from ``llama_cpp.llama_cpp.llama_model_default_params()``, looked up
    through the binding module at call time, so wrapping that function is enough. Returns whether the field exists.
    """
    import llama_cpp.llama_cpp as binding

    fields = {f[0] for f in binding.llama_model_params._fields_}
    if "use_extra_bufts" not in fields:
        return False
    make_defaults = binding.llama_model_default_params

    def defaults_without_extra_bufts() -> Any:
        params = make_defaults()
        params.use_extra_bufts = False
        return params

    binding.llama_model_default_params = defaults_without_extra_bufts
    return True


def _measure(gguf: str, threads: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    import llama_cpp

    patched = _disable_extra_bufts()
    n_ctx = max(PP_PROMPT_TOKENS, DECODE_PROMPT_TOKENS + new_tokens) + 64
    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                          seed=0, verbose=False)
    ids = llm.tokenize((_TEXT * 20).encode())
    if len(ids) < PP_PROMPT_TOKENS:
        raise RuntimeError(f"prompt text gave only {len(ids)} tokens, need {PP_PROMPT_TOKENS}")
    long_prompt, short_prompt = ids[:PP_PROMPT_TOKENS], ids[:DECODE_PROMPT_TOKENS]

    def prompt_seconds() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_prompt)
        return time.perf_counter() - start

    def decode(n: int) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(short_prompt)
        out: list[int] = []
        start = time.perf_counter()
        for _ in range(n):
            tok = llm.sample(temp=0.0)  # temperature 0: llama.cpp's greedy sampler
            out.append(tok)
            llm.eval([tok])
        return time.perf_counter() - start, out

    prompt_seconds()  # warm-up: first-call allocations and page faults
    decode(8)
    pp, tg = [], []
    out: list[int] = []
    for _ in range(repeats):
        pp.append(PP_PROMPT_TOKENS / prompt_seconds())
        seconds, out = decode(new_tokens)
        tg.append(new_tokens / seconds)
    return {"llama_cpp_version": getattr(llama_cpp, "__version__", None), "threads": threads, "new_tokens": new_tokens,
            "prompt_tokens": PP_PROMPT_TOKENS, "decode_prompt_tokens": DECODE_PROMPT_TOKENS, "prompt_tok_s": pp,
            "decode_tok_s": tg, "extra_bufts_disabled": patched,
            "sample": llm.detokenize(out[:30]).decode(errors="replace")}


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Measure llama.cpp decode and prompt tokens/s; prints one JSON line.")
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    # Run as a script, this file's directory (engine/) heads sys.path; drop it so none of our modules shadow others.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    print(json.dumps(_measure(args.gguf, args.threads, args.new_tokens, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
