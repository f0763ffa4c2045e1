"""``python -m engine bench``: the speed figures of the engine issue, measured in one run on the same weights.

Every figure is a same-run ratio against a peer (``transformers`` ``generate`` on the very same weights, exported
with :func:`weights.hf.write`; the memory-bandwidth roofline; our own no-cache path; turn 1 vs turn 10; one
session vs eight; base vs mixed adapters; llama.cpp on SmolLM2's GGUF, run in its own venv by
:mod:`engine.bench_llama`), all with the same dtype and thread count. ``transformers`` is imported lazily: peers are
never engine dependencies. The output is a Markdown table (stdout) and a JSON file; decode timings are medians of
``--repeats`` rounds (ours and the peer side by side in each), serving figures medians of :data:`ROUNDS` rounds
(TTFT: :data:`TTFT_ROUNDS`, each timing a fresh session's turn 1 next to a chat's turn 10, in both orders); every
ratio is the median of the rounds' ratios. Two rows put the roofline in context: the stream ceiling (the step's
weight matrices read one at a time with no arithmetic, :func:`stream_ceiling`: what a step structured like ours can
get from this memory) and llama.cpp against its own roofline (its GGUF's bytes a token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from engine.generate import generate_tokens, generate_uncached
from engine.lora import load_adapter, projection_shapes
from engine.prepack import huge_page_buffer
from engine.quant import quant_supported
from engine.registry import LoadedModel, Registry, default_dtype
from engine.requests import Request
from engine.sampling import GenerationConfig
from engine.scheduler import Scheduler
from engine.sessions import Engine
from engine.threads import openmp_workers, run_in_fresh_thread
from weights import store

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the variants measured: (weights dtype, quantization); int8 is weight-only int8 (engine.quant) with the activations
# in the dtype this CPU serves by default (our kernels take float32 or bf16; PyTorch's int8 kernel bf16 only)
VARIANTS = {"bf16": (torch.bfloat16, "none"), "int8": (None, "int8"), "fp32": (torch.float32, "none")}


def variant(name: str) -> tuple[torch.dtype, str]:
    dtype, quant = VARIANTS[name]
    if dtype is None:
        dtype = default_dtype() if quant_supported(default_dtype()) else torch.bfloat16
    return dtype, quant


ROUNDS = 4  # rounds of each serving figure (medians; even: each pair runs in both orders equally often): one run
# of each swings by +-15% on a shared 2-core VM
TTFT_ROUNDS = 6  # a turn's TTFT is one ~50 ms sample: more rounds of it (even: see ROUNDS)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _prompt(lm: LoadedModel, n: int = 32) -> list[int]:
    ids = lm.tokenizer.encode("The history of the city begins long ago, when the river was young and the hills " * 8)
    return (ids * (n // max(len(ids), 1) + 1))[:n] if ids else list(range(1, n + 1))


def decode_ours(lm: LoadedModel, n_new: int, repeats: int) -> tuple[float, float]:
    """Decode tokens/s of one request through the scheduler (batch 1, greedy, EOS ignored), and the read bandwidth
    right before and right after the timed runs, after the warm-up run (the higher of the two readings: the roofline
    peer of these runs; a reading taken before the warm-up would be seconds older than the runs it is compared to,
    across this VM's bandwidth phases)."""
    sched = Scheduler(max_batch=1)
    try:
        cfg = GenerationConfig(max_new_tokens=n_new)

        def once() -> float:
            h = sched.submit(Request(lm, None, _prompt(lm), cfg))
            for _d in h:
                pass
            return h.result.decode_tokens_per_s

        once()  # warm up
        before = run_in_fresh_thread(read_bandwidth)
        rates = [once() for _ in range(repeats)]
        return _median(rates), max(before, run_in_fresh_thread(read_bandwidth))
    finally:
        sched.close()


def _hf_model(lm: LoadedModel, root: Path, dtype: torch.dtype, tmp: Path) -> Any:
    from transformers import AutoModelForCausalLM  # benchmark peer only

    from weights import hf

    folder = tmp / f"hf-{lm.name}"
    if not folder.exists():
        manifest, state = store.read(lm.name, root)
        hf.write(folder, manifest, state)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def decode_hf(model: Any, prompt: list[int], n_new: int, repeats: int) -> float:
    """transformers' generate (KV cache on, greedy): decode tokens/s = (n - 1) / (t(n) - t(1))."""
    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - t

    run(4)
    first = _median([run(1) for _ in range(repeats)])
    full = _median([run(n_new) for _ in range(repeats)])
    return (n_new - 1) / max(full - first, 1e-9)


def decode_side_by_side(lm: LoadedModel, hf_model: Any | None, n_new: int,
                        rounds: int) -> tuple[list, list, list, list]:
    """Decode tokens/s of ours and of the transformers peer (when given), one run of each per round, side by side,
    the read bandwidth right before and right after our run (the higher of the two: the roofline peer of that
    run), and then the step's stream ceiling (:func:`stream_ceiling`). This VM's speed drifts by up to 2x over tens
    of seconds (the bandwidth between ~30 and ~58 GB/s), so a ratio of figures taken a minute apart says little;
    each ratio is the median of the rounds' ratios. Each side warms up first."""
    ours, theirs, bandwidths, ceilings = [], [], [], []
    prompt, pieces = _prompt(lm), step_pieces(lm)
    for _ in range(rounds):
        rate, bandwidth = decode_ours(lm, n_new, 1)
        ours.append(rate)
        bandwidths.append(bandwidth)
        ceilings.append(run_in_fresh_thread(lambda: stream_ceiling(pieces)))
        if hf_model is not None:
            theirs.append(run_in_fresh_thread(lambda: decode_hf(hf_model, prompt, n_new, 1)))
    return ours, theirs, bandwidths, ceilings


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s for summing a large buffer (what a memory-bound decode step does with the weights), on transparent
    huge pages as the packed weights are (engine.prepack): in this VM a 4 KB-page buffer reads 3-10% slower, and
    the roofline is the best this memory gives."""
    x = huge_page_buffer(nbytes).view(torch.float32)
    x.fill_(1.0)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / min(times)


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(module: torch.nn.Module) -> int:
    """Bytes a decode step reads of one module's own parameters: its int8 copy (engine.quant) instead of the weight."""
    w8 = module.__dict__.get("int8")
    return sum(_nbytes(w8) if w8 is not None and n == "weight" else _nbytes([p])
               for n, p in module.named_parameters(recurse=False))


def _head_bytes(lm: LoadedModel) -> tuple[int, int]:
    """(bytes a decode step reads of the head: its int8 copy if it has one, bytes of the float head weight)."""
    head8 = lm.model.__dict__.get("head_int8")
    head = lm.model.tok_emb.weight if lm.model.lm_head is None else lm.model.lm_head.weight
    return (_nbytes(head8) if head8 is not None else _nbytes([head])), _nbytes([head])


def step_pieces(lm: LoadedModel) -> list[int]:
    """The weight bytes of a decode step's products in the order it reads them (per block: q/k/v together, the
    output projection, gate/up together, down; then the head), each rounded up to 128 bytes: what
    :func:`stream_ceiling` streams."""
    def rounded(n: int) -> int:
        return -(-n // 128) * 128

    pieces = []
    for block in lm.model.blocks:
        a, m = block.attn, block.mlp
        gate_up = [m.gate_proj, m.up_proj] if m.swiglu else [m.up_proj]
        pieces += [rounded(sum(map(_module_bytes, group)))
                   for group in ([a.q_proj, a.k_proj, a.v_proj], [a.o_proj], gate_up, [m.down_proj])]
    return pieces + [rounded(_head_bytes(lm)[0])]


def stream_ceiling(pieces: list[int], repeats: int = 5) -> float:
    """Bytes/s for reading ``pieces`` one after the other, each in one parallel region over the threads (the end of
    each a barrier), no arithmetic: the most a decode step that reads its products one at a time can get from this
    memory (``scratchchat::read_pieces``), on huge pages as the packed weights are."""
    total = sum(pieces)
    buf = huge_page_buffer(total)
    buf.view(torch.float32).fill_(1.0)
    torch.ops.scratchchat.read_pieces(buf, pieces)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.ops.scratchchat.read_pieces(buf, pieces)
        times.append(time.perf_counter() - t)
    return total / min(times)


def weight_bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of weights one decode step reads: every parameter except the position table (one row is read); for
    an int8 projection or head, its int8 copy and scales instead of its float weight."""
    read, stored = _head_bytes(lm)
    total = read - stored  # an int8 head copy is read instead of the float head (tied: the embedding's weight)
    for module_name, module in lm.model.named_modules():
        if module_name != "pos_emb":
            total += _module_bytes(module)
    return total


def no_cache_speedup(lm: LoadedModel, n_new: int) -> dict[str, float]:
    prompt = _prompt(lm, 16)
    cfg = GenerationConfig(max_new_tokens=n_new)
    with torch.inference_mode():
        list(generate_tokens(lm.model, prompt, GenerationConfig(max_new_tokens=4)))  # warm up both paths
        list(generate_uncached(lm.model, prompt, GenerationConfig(max_new_tokens=4)))
        # the cached run before and after the uncached one (a minute long, it averages over the VM's drift; one
        # cached run of a few seconds samples a fast or a slow spell), their mean against it
        t = time.perf_counter()
        a = list(generate_tokens(lm.model, prompt, cfg))
        before = time.perf_counter() - t
        t = time.perf_counter()
        b = list(generate_uncached(lm.model, prompt, cfg))
        uncached = time.perf_counter() - t
        t = time.perf_counter()
        a2 = list(generate_tokens(lm.model, prompt, cfg))
        after = time.perf_counter() - t
    cached = (before + after) / 2
    return {"new_tokens": n_new, "cached_s": cached, "cached_s_runs": [before, after], "uncached_s": uncached,
            "speedup": uncached / cached, "same_tokens": a == b == a2}


def _scratch_root(base_root: Path, name: str, tmp: Path) -> Path:
    """A throwaway models root whose ``name`` links to the real files (adapters written here stay out of the
    user's store)."""
    root = tmp / "store"
    dst = root / name
    if not dst.exists():
        dst.mkdir(parents=True)
        for f in store.model_dir(name, base_root).iterdir():
            if f.is_file():
                (dst / f.name).symlink_to(f)
    return root


def _write_adapter(root: Path, base: str, adapter: str, lm: LoadedModel, rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(lm.config.n_layers):
        for proj, (n_in, n_out) in projection_shapes(lm.config).items():
            blk = "attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.blocks.{i}.{blk}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
    folder = store.adapter_dir(base, adapter, root)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": sorted(projection_shapes(lm.config))}))
    (folder / "scratchchat.json").write_text(json.dumps({"base": base, "base_sha256": lm.sha256}))
    return folder


def _aggregate(sched: Scheduler, reqs: list[Request]) -> float:
    """Generated tokens per second of wall time for requests submitted together."""
    t = time.perf_counter()
    handles = [sched.submit(r) for r in reqs]
    counts = [0] * len(handles)

    def drain(i: int) -> None:
        for d in handles[i]:
            counts[i] += len(d.token_ids)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(handles))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t)


def serving_figures(root: Path, name: str, dtype: torch.dtype, tmp: Path, n_new: int) -> dict[str, Any]:
    """Turn-10 TTFT, 8 sessions vs 1, mixed adapters vs base, adapter switch and load times."""
    scratch = _scratch_root(root, name, tmp)
    engine = Engine(scratch, dtype=dtype)
    out: dict[str, Any] = {}
    try:
        lm = engine.load(name)
        for i in range(3):  # torch ops on GPT-2's larger tensors fork: not in this long-lived thread (engine.threads)
            run_in_fresh_thread(lambda i=i: _write_adapter(scratch, name, f"bench-{i}", lm, rank=16, seed=i))
        t = time.perf_counter()  # in a fresh thread, as the registry loads adapters (thread start included)
        run_in_fresh_thread(lambda: load_adapter(store.adapter_dir(name, "bench-0", scratch), lm.config, dtype=dtype))
        out["adapter_load_ms"] = 1e3 * (time.perf_counter() - t)

        # TTFT: turn 1 vs turn 10 (~1000 tokens of history), after a throwaway turn that allocates the KV pool;
        # TTFT_ROUNDS conversations (one turn is a single ~50 ms sample on a noisy machine)
        engine.new_session(name, system_prompt="").complete("Hello", GenerationConfig(max_new_tokens=2))
        msg = "Tell me more about the history of the old city by the river, and about its people. " * 2
        # answers of 60 tokens make ~1050 tokens of history at turn 10, more than GPT-2's 1024 positions hold with
        # room for an answer: there turn 10 would drop the oldest turns (the overflow policy) and time a re-prefill
        # of the whole history, not a cached turn; 40-token answers there (~900 tokens of history)
        answer = 60 if engine.context_length(lm) >= 2048 else 40
        cfg_turn = GenerationConfig(max_new_tokens=answer)
        firsts, tenths, truncated = [], [], 0
        for r in range(TTFT_ROUNDS):
            s = engine.new_session(name, system_prompt="")
            for turn in range(9):
                # a different message each turn: identical turns (with a random model's empty answers) would make
                # a history that drops its oldest turn tokenize exactly like the last one, all of it cached
                s.complete(f"({turn + 1}) {msg}", cfg_turn)
                truncated += s.last_usage.truncated_turns
            # turn 1 (a fresh session's) next to turn 10: side by side, as the VM's speed drifts by up to 2x between
            # the seconds a round takes, and before it in even rounds, after it in odd ones
            one = engine.new_session(name, system_prompt="")
            turns = [lambda: one.complete(f"(1) {msg}", cfg_turn), lambda: s.complete(f"(10) {msg}", cfg_turn)]
            for turn in turns if r % 2 == 0 else turns[::-1]:
                turn()
            truncated += s.last_usage.truncated_turns
            firsts.append(one.last_usage.ttft_s)
            tenths.append(s.last_usage.ttft_s)
        out["history_tokens_turn10"] = s.last_usage.prompt_tokens
        out["cached_tokens_turn10"] = s.last_usage.cached_tokens  # what turn 10 did not prefill
        out["ttft_turns_dropped"] = truncated  # 0 unless the history outgrew the context (then not a cached turn)
        out["ttft_turn1_ms"], out["ttft_turn10_ms"] = 1e3 * _median(firsts), 1e3 * _median(tenths)
        out["ttft_ratio"] = _median([t / f for t, f in zip(tenths, firsts, strict=True)])

        # switching a session's adapter (already loaded)
        engine.adapter(lm, "bench-1")
        t = time.perf_counter()
        for i in range(20):
            s.set_adapter("bench-1" if i % 2 == 0 else None)
        out["adapter_switch_ms"] = 1e3 * (time.perf_counter() - t) / 20

        sched = engine.scheduler
        cfg = GenerationConfig(max_new_tokens=n_new)
        prompt = _prompt(lm)
        _aggregate(sched, [Request(lm, None, prompt, GenerationConfig(max_new_tokens=8))])  # warm up
        ads = [None] + [engine.adapter(lm, f"bench-{i}") for i in range(3)]
        # ROUNDS rounds of each pair, side by side, the pair's order swapped every round (the VM's speed drifts
        # over the seconds a round takes: one order would always give the drift to the same side); the ratio is
        # the median of the rounds' ratios
        one, eight, base4, mixed4 = [], [], [], []
        for r in range(ROUNDS):
            pairs = [(one, [Request(lm, None, prompt, cfg)]),
                     (eight, [Request(lm, None, prompt, cfg) for _ in range(8)]),
                     (base4, [Request(lm, None, prompt, cfg) for _ in range(4)]),
                     (mixed4, [Request(lm, a, prompt, cfg) for a in ads])]
            for first, second in (pairs[0:2], pairs[2:4]):
                for runs, reqs in (first, second) if r % 2 == 0 else (second, first):
                    runs.append(_aggregate(sched, reqs))
        out.update(tok_s_1_session=_median(one), tok_s_8_sessions=_median(eight),
                   sessions_ratio=_median([e / o for e, o in zip(eight, one, strict=True)]),
                   tok_s_base_batch4=_median(base4), tok_s_mixed_adapters_batch4=_median(mixed4),
                   mixed_slowdown=_median([b / m for b, m in zip(base4, mixed4, strict=True)]))
        time.sleep(0.2)  # idle: the workers park
        out["openmp_workers"] = openmp_workers()  # the scheduler's team is threads - 1; more slows every step
    finally:
        engine.close()
    return out


def _llama_cpp_row(args: argparse.Namespace, ours_tok_s: float | None) -> dict[str, Any]:
    """llama.cpp decoding SmolLM2's Q4_1 GGUF with the same thread count, run in its own venv (see bench_llama)."""
    from engine.bench_llama import llama_cpp_row
    from weights.fetch import get_smollm2_gguf

    try:
        gguf = get_smollm2_gguf()
    except Exception as e:  # offline without a cached GGUF: the other rows still count
        return {"skipped": f"no SmolLM2 GGUF: {e}"}
    before = run_in_fresh_thread(read_bandwidth)
    out = llama_cpp_row(gguf, args.threads, args.new_tokens, args.llama_python, repeats=args.repeats)
    if "llama_cpp_tok_s" in out:
        # the peer against its own roofline: the GGUF's tensor bytes (all read each token; the tied embedding once,
        # as the head) over the bandwidth read right before and right after its runs
        bw = max(before, run_in_fresh_thread(read_bandwidth))
        out["llama_cpp_weight_bytes_per_token"] = gguf_tensor_bytes(gguf)
        out["llama_cpp_roofline_tok_s"] = bw / out["llama_cpp_weight_bytes_per_token"]
        out["llama_cpp_roofline_fraction"] = out["llama_cpp_tok_s"] / out["llama_cpp_roofline_tok_s"]
    if "llama_cpp_tok_s" in out and ours_tok_s:
        out.update(ours_tok_s=ours_tok_s, ratio=ours_tok_s / out["llama_cpp_tok_s"])
    return out


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of every tensor in a GGUF file, as stored (quantized blocks included)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def cpu_summary() -> str:
    """The CPU model and the vector/matrix extensions that decide which kernels are fast (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(shown) or 'no AVX2'}), {os.cpu_count()} cores"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    root = Path(args.models_dir) if args.models_dir else store.models_dir()
    present = {m["name"] for m in store.list_models(root)}
    results: dict[str, Any] = {"cpu": cpu_summary(), "threads": args.threads, "new_tokens": args.new_tokens,
                               "models": {}}
    # every measurement that runs torch outside the scheduler does so in a thread that exits, so that no OpenMP
    # team outlives it and slows the next figure (engine.threads); the transformers peer gets the same treatment
    bandwidths = [run_in_fresh_thread(read_bandwidth)]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name in args.models:
            if name not in present:
                results["models"][name] = {"skipped": f"not in the store {root}"}
                continue
            row: dict[str, Any] = {}
            hf_models: dict[torch.dtype, Any] = {}  # the transformers peer per dtype (int8 runs against its dtype's)
            for dname in args.dtypes:
                dtype, quant = variant(dname)
                lm = Registry(root, dtype=dtype, quant=quant).get(name)
                hf_error = None
                if not args.skip_hf and dtype not in hf_models:
                    try:
                        hf_models[dtype] = run_in_fresh_thread(lambda: _hf_model(lm, root, dtype, tmp))
                    except Exception as e:  # the peer failing must not hide our own figures
                        hf_error = f"{type(e).__name__}: {e}"
                ours, hf_rates, bws, ceils = decode_side_by_side(lm, hf_models.get(dtype), args.new_tokens,
                                                                 args.repeats)
                r: dict[str, Any] = {"ours_tok_s": _median(ours),
                                     "decode_kernels": lm.model.__dict__.get("decode_kernels"),
                                     "activations": str(dtype).removeprefix("torch.")}
                nbytes = r["weight_bytes_per_token"] = weight_bytes_per_token(lm)
                # the roofline side by side: each round's tokens/s against the bandwidth read next to it
                r["read_bandwidth_gb_s"] = [b / 1e9 for b in bws]
                r["ours_tok_s_rounds"] = ours
                r["roofline_fraction_rounds"] = [o / (b / nbytes) for o, b in zip(ours, bws, strict=True)]
                r["roofline_tok_s"] = _median(bws) / nbytes
                r["roofline_fraction"] = _median([o / (b / nbytes) for o, b in zip(ours, bws, strict=True)])
                # the step's products read one at a time with no arithmetic: the most that structure allows
                r["stream_ceiling_gb_s"] = [c / 1e9 for c in ceils]
                r["stream_ceiling_fraction"] = _median([c / b for c, b in zip(ceils, bws, strict=True)])
                r["stream_ceiling_tok_s"] = _median(ceils) / nbytes
                r["step_products"] = len(step_pieces(lm))
                bandwidths += bws
                if hf_rates:
                    r["hf_tok_s"] = _median(hf_rates)
                    r["hf_tok_s_rounds"] = hf_rates
                    r["vs_hf"] = _median([o / h for o, h in zip(ours, hf_rates, strict=True)])
                elif hf_error:
                    r["hf_error"] = hf_error
                row[dname] = r
            row["no_cache"] = {}
            for dname in args.dtypes:
                dtype, quant = variant(dname)
                if (dtype != default_dtype() or quant != "none") and not args.no_cache_all:  # emulated bf16: hours
                    continue
                lm = Registry(root, dtype=dtype, quant=quant).get(name)
                row["no_cache"][dname] = run_in_fresh_thread(lambda: no_cache_speedup(lm, args.no_cache_tokens))
            # serving figures in the dtype this CPU serves by default (bf16 only with native bf16 matmuls: without
            # them bf16 decodes one row fast but batches and prefills several times slower than fp32)
            row["serving_dtype"] = str(default_dtype()).removeprefix("torch.")
            row["serving"] = serving_figures(root, name, default_dtype(), tmp, args.new_tokens // 2)
            results["models"][name] = row
    # also against the best bandwidth reading of the whole run (the VM's fastest phase, whenever it came): the
    # harsher figure, shown next to the side-by-side one
    bw = max(bandwidths)
    results["read_bandwidth_gb_s"] = bw / 1e9
    for row in results["models"].values():
        for dname in VARIANTS:
            r = row.get(dname)
            if r:
                r["roofline_fraction_vs_run_max"] = r["ours_tok_s"] / (bw / r["weight_bytes_per_token"])
    smol = results["models"].get("smollm2-135m-instruct", {})
    best = max((smol[d]["ours_tok_s"], d) for d in args.dtypes if d in smol) if smol and "skipped" not in smol \
        else (None, None)
    results["llama_cpp"] = _llama_cpp_row(args, best[0])
    results["llama_cpp"]["ours_variant"] = best[1]
    return results


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"{res.get('cpu', '')}; threads={res['threads']}, read bandwidth up to {res['read_bandwidth_gb_s']:.1f} "
             f"GB/s, {res['new_tokens']} new tokens"]
    for name, row in res["models"].items():
        for dname in VARIANTS:
            kernels = (row.get(dname) or {}).get("decode_kernels")
            if kernels:
                lines.append(f"- {name} {dname} decode kernels: {', '.join(f'{k} {v}' for k, v in kernels.items())}")
        if "serving_dtype" in row:
            lines.append(f"- {name} serving figures (sessions, adapters) in {row['serving_dtype']}, this CPU's default")
            workers = row.get("serving", {}).get("openmp_workers")
            if workers is not None and workers > res["threads"] - 1:
                lines.append(f"  - warning: {workers} OpenMP workers in the process while serving, more than the "
                             f"scheduler's {res['threads'] - 1}: another thread holds a team, the serving figures "
                             "are understated (engine.threads)")
    lines += ["", "| model | figure | ours | peer | ratio | target |", "|---|---|---|---|---|---|"]
    for name, row in res["models"].items():
        if "skipped" in row:
            lines.append(f"| {name} | — | skipped: {row['skipped']} | | | |")
            continue
        for dname in ("bf16", "int8", "fp32"):
            r = row.get(dname)
            if not r:
                continue
            act = r.get("activations", "bfloat16").replace("bfloat16", "bf16").replace("float32", "fp32")
            target = {"bf16": "≥ 2.0×", "fp32": "≥ 1.2×", "int8": f"({act} row)"}[dname]
            label = f"int8 weights ({act}) vs transformers {act}" if dname == "int8" else f"{dname} vs transformers"
            if "hf_tok_s" in r:
                lines.append(f"| {name} | decode tok/s {label} | {r['ours_tok_s']:.1f} | "
                             f"{r['hf_tok_s']:.1f} | {r['vs_hf']:.2f}× | {target} |")
            else:
                lines.append(f"| {name} | decode tok/s {dname} | {r['ours_tok_s']:.1f} | "
                             f"{r.get('hf_error', 'skipped')} | | {target} |")
            lines.append(f"| {name} | decode tok/s {dname} vs roofline (bandwidth read next to each run; vs the "
                         f"run's best reading: {100 * r['roofline_fraction_vs_run_max']:.0f}%) | "
                         f"{r['ours_tok_s']:.1f} | {r['roofline_tok_s']:.1f} | {100 * r['roofline_fraction']:.0f}% | "
                         f"≥ 60% |")
            if "stream_ceiling_fraction" in r:
                lines.append(f"| {name} | ceiling: the step's {r['step_products']} weight matrices read one at a "
                             f"time, no arithmetic, vs roofline | {r['stream_ceiling_tok_s']:.1f} | "
                             f"{r['roofline_tok_s']:.1f} | {100 * r['stream_ceiling_fraction']:.0f}% | (the most "
                             f"the row above can reach) |")
        for dname, nc in row["no_cache"].items():
            lines.append(f"| {name} | cache vs no cache, {nc['new_tokens']} tokens {dname} (s) | "
                         f"{nc['cached_s']:.2f} | {nc['uncached_s']:.2f} | {nc['speedup']:.1f}× | ≥ 10× |")
        sv = row["serving"]
        lines += [
            f"| {name} | TTFT turn 10 ({sv['history_tokens_turn10']} tokens) vs turn 1 (ms) | "
            f"{sv['ttft_turn10_ms']:.0f} | {sv['ttft_turn1_ms']:.0f} | "
            f"{sv['ttft_ratio']:.2f}×"
            f"{' (turns dropped: overflow, not a cached turn)' if sv.get('ttft_turns_dropped') else ''} | ≤ 1.2× |",
            f"| {name} | aggregate tok/s, 8 sessions vs 1 | {sv['tok_s_8_sessions']:.1f} | {sv['tok_s_1_session']:.1f} "
            f"| {sv['sessions_ratio']:.1f}× | ≥ 4× |",
            f"| {name} | tok/s, none + 3 adapters vs base (batch 4) | {sv['tok_s_mixed_adapters_batch4']:.1f} | "
            f"{sv['tok_s_base_batch4']:.1f} | {sv['mixed_slowdown']:.2f}× slower | ≤ 1.3× |",
            f"| {name} | switch a session's adapter (ms) | {sv['adapter_switch_ms']:.3f} | | | ≤ 10 ms |",
            f"| {name} | load a rank-16 adapter (ms) | {sv['adapter_load_ms']:.0f} | | | ≤ 200 ms |",
        ]
    lc = res["llama_cpp"]
    if "llama_cpp_tok_s" in lc and "ratio" in lc:
        lines.append(f"| smollm2-135m-instruct | decode tok/s ({lc.get('ours_variant')}) vs llama.cpp Q4_1 | "
                     f"{lc['ours_tok_s']:.1f} | "
                     f"{lc['llama_cpp_tok_s']:.1f} | {lc['ratio']:.2f}× | ≥ 0.75× |")
    elif "llama_cpp_tok_s" in lc:
        lines.append(f"| llama.cpp | decode tok/s, SmolLM2 Q4_1 (ours not measured) | | {lc['llama_cpp_tok_s']:.1f} "
                     "| | ≥ 0.75× |")
    else:
        lines.append(f"| llama.cpp | decode tok/s vs llama.cpp Q4_1 | | {lc.get('skipped', '')} | | ≥ 0.75× |")
    if "llama_cpp_roofline_fraction" in lc:
        lines.append(f"| llama.cpp | its decode tok/s (Q4_1, {lc['llama_cpp_weight_bytes_per_token'] / 1e6:.1f} MB a "
                     f"token) vs its roofline | {lc['llama_cpp_tok_s']:.1f} | {lc['llama_cpp_roofline_tok_s']:.1f} | "
                     f"{100 * lc['llama_cpp_roofline_fraction']:.0f}% | (the peer, for the roofline rows) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gpt2-small"])
    p.add_argument("--dtypes", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="variants to measure; int8 = weight-only int8 (SCRATCHCHAT_QUANT=int8), activations in the "
                        "CPU's default dtype")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--no-cache-tokens", type=int, default=500)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cache-all", action="store_true",
                   help="time the no-cache path in every variant, not only in this CPU's serving dtype (without native "
                        "bf16 matmuls the bf16 recompute runs for hours)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers peer")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--llama-python", default=None,
                   help="python of the llama.cpp bench venv (default: $SCRATCHCHAT_LLAMA_PYTHON, else the venv made by "
                        "scripts/bench-llama-env.sh)")
    p.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    res = run(args)
    print(to_markdown(res))
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
