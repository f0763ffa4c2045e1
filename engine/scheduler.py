"""Continuous batching: one background thread owns every forward pass and interleaves all requests.

Orca-style iteration-level scheduling (Yu et al. 2022; vLLM, LoRAX): requests join or leave a batch between
decode steps. Each base model has a pool, one pre-allocated :class:`~engine.kv_cache.KVCache` of ``max_batch``
rows. Decoding rows are kept compact at the front, so a decode step is one call
``model(tokens (A, 1), cache=pool.rows(0, A), lora=hook)``; the cache builds the per-row position masks since
rows hold different lengths. A joining request is prefilled on row ``A`` (the first free one) in chunks, so a long
prompt never stalls the others for more than one chunk, then becomes decoding row ``A``; requests that join together
with short prompts (a burst of chats) prefill as one padded pass over rows ``A, A + 1, ...`` and start decoding
together. A finished row is replaced by the last decoding row (one row copy), keeping the front compact.

Each loop iteration gives every pool at most one prefill chunk and one decode step (round-robin: no request
starves). Limits: a bounded wait queue (:class:`~engine.errors.EngineBusy` when full) and a byte budget for all
pools' KV caches (a pool gets fewer rows when the budget is short). Cancellation is checked before every step: a
cancelled request ends within one decode step, reports ``finish_reason="cancelled"`` and frees its row.

Per-row sampling settings and seeded generators (:func:`engine.sampling.sample_rows`), per-row LoRA adapters
(:class:`engine.lora.BatchLora`, rebuilt only when the batch composition changes), per-row stop ids/strings and
UTF-8-safe text (:class:`engine.generate.TextStream`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque

import torch

from engine.errors import EngineBusy, EngineError
from engine.generate import Delta, TextStream, Usage
from engine.kv_cache import KVCache
from engine.lora import BatchLora, LoraAdapter
from engine.registry import LoadedModel
from engine.requests import Handle, Request, Result
from engine.sampling import build_generator, sample_rows

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
DEFAULT_KV_MEMORY = 2 << 30  # bytes for all pools' KV caches together
DEFAULT_MAX_CONTEXT = 4096  # tokens per row; a model's own context_length is used when smaller
DEFAULT_PREFILL_CHUNK = 256  # tokens per prefill step while other rows are decoding

# schedulers whose thread runs, stopped when the interpreter exits (see _close_at_exit)
_running: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Stop every scheduler thread before the interpreter finalizes. A daemon thread still inside a torch op at exit
    (a script that returns right after its last answer, while the thread finishes that request) is ended by
    ``pthread_exit`` in the middle of C++ frames, and the process aborted ("terminate called without an active
    exception", exit code 134) about half the time."""
    for sched in list(_running):
        sched.close()


class _Active:
    """Scheduler-side state of one admitted request."""

    def __init__(self, handle: Handle) -> None:
        r = handle.request
        self.handle = handle
        self.req = r
        self.stream = TextStream(r.lm.tokenizer, stop_strings=r.stop_strings + r.cfg.stop, stop_ids=r.stop_ids)
        self.generator = build_generator(r.cfg.seed)
        self.generated: list[int] = []
        self.prefilled = 0  # prompt tokens in the cache so far
        self.next_token: int | None = None  # sampled but not yet fed to the model
        self.t_submit = handle.t_submit
        self.t_first: float | None = None
        self.t_last: float | None = None


def _cached(r: Request) -> int:
    """Prompt tokens of ``r`` whose keys and values come from its session's cache (not prefilled)."""
    return r.prefix_len if r.prefix is not None else 0


class _Pool:
    """One base model's KV cache rows: decoding rows at [0, A), the prefilling ones (if any) at [A, A + n)."""

    def __init__(self, lm: LoadedModel, rows: int, seq_len: int) -> None:
        self.lm = lm
        self.cache = KVCache.build(lm.config, rows, seq_len, dtype=lm.dtype)
        self.decoding: list[_Active] = []
        self.prefilling: list[_Active] = []
        self._hook_key: tuple | None = None
        self._hook: BatchLora | None = None
        self._prefill_key: tuple | None = None
        self._prefill_hook: BatchLora | None = None

    @property
    def max_rows(self) -> int:
        return self.cache.batch_size

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    @property
    def busy(self) -> bool:
        return bool(self.decoding) or bool(self.prefilling)

    def hook(self, adapters: list[LoraAdapter | None]) -> BatchLora | None:
        """The LoRA hook for this composition of decoding rows, cached until the composition changes."""
        key = self._key(adapters)
        if key != self._hook_key:
            self._hook_key, self._hook = key, self._build(adapters)
        return self._hook

    def prefill_hook(self, adapter: LoraAdapter | None) -> BatchLora | None:
        """The hook for one prefilling row: the last one is kept, so a prompt of several chunks, or requests with
        the same adapter in a row, list its pieces once (and an unloaded adapter is held by one at most)."""
        key = self._key([adapter])
        if key != self._prefill_key:
            self._prefill_key, self._prefill_hook = key, self._build([adapter])
        return self._prefill_hook

    def _key(self, adapters: list[LoraAdapter | None]) -> tuple:
        merged = self.lm.merged.adapter if self.lm.merged is not None else None
        return tuple(None if a is None else a.key for a in adapters), None if merged is None else merged.key

    def _build(self, adapters: list[LoraAdapter | None]) -> BatchLora | None:
        merged = self.lm.merged.adapter if self.lm.merged is not None else None
        hook = BatchLora(adapters, merged=merged)
        return None if hook.is_empty else hook


class Scheduler:
    """Owns the forward passes of all loaded models in one background thread.

    Args:
        max_batch: rows per base model decoded together (``$SCRATCHCHAT_MAX_BATCH``).
        max_queue: requests allowed to wait for a row; more raise :class:`EngineBusy`.
        kv_memory: bytes for all pools' KV caches (``$SCRATCHCHAT_KV_MEMORY``).
        max_context: tokens per row (``$SCRATCHCHAT_MAX_CONTEXT``), capped by each model's context_length.
        prefill_chunk: prompt tokens per prefill step while other rows decode.
    """

    def __init__(self, *, max_batch: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 kv_memory: int | None = None, max_context: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        env = os.environ.get
        self.max_batch = max_batch or int(env("SCRATCHCHAT_MAX_BATCH", DEFAULT_MAX_BATCH))
        self.max_queue = max_queue
        self.kv_memory = kv_memory or int(env("SCRATCHCHAT_KV_MEMORY", DEFAULT_KV_MEMORY))
        self.max_context = max_context or int(env("SCRATCHCHAT_MAX_CONTEXT", DEFAULT_MAX_CONTEXT))
        self.prefill_chunk = prefill_chunk
        self._waiting: deque[Handle] = deque()
        self._pools: dict[str, _Pool] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (for tests and stats)

    # ---- caller side
    def context_length(self, lm: LoadedModel) -> int:
        """Tokens one request may hold (prompt + answer) on this model."""
        return min(lm.config.context_length, self.max_context)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request; returns its handle at once.

        Raises:
            EngineBusy: the wait queue is full.
            ValueError: an empty prompt or a prompt that leaves no room to answer.
        """
        n_ctx = self.context_length(request.lm)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty; nothing to continue from")
        if len(request.prompt_ids) >= n_ctx:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens leaves no room in a context of {n_ctx}")
        if not 0 <= request.prefix_len < len(request.prompt_ids):
            raise ValueError(f"prefix_len {request.prefix_len} must be < the prompt length {len(request.prompt_ids)}")
        handle = Handle(request, loop)
        with self._cv:
            if self._closed:
                raise EngineError("the engine is shut down")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"the engine is busy ({len(self._waiting)} requests waiting); retry in a moment")
            self._waiting.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),),
                                                name="scratchchat-scheduler", daemon=True)
                self._thread.start()
                _running.add(self)
            self._cv.notify()
        return handle

    def is_busy(self, model_name: str) -> bool:
        """True while requests for ``model_name`` wait or run (the registry must not evict it then)."""
        with self._cv:
            pool = self._pools.get(model_name)
            return (pool is not None and pool.busy) or any(h.request.lm.name == model_name for h in self._waiting)

    def release(self, model_name: str) -> None:
        """Free the KV pool of ``model_name`` if it is idle (its base was unloaded)."""
        with self._cv:
            pool = self._pools.get(model_name)
            if pool is not None and not pool.busy:
                del self._pools[model_name]

    def stats(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting),
                    "pools": {n: {"rows": p.max_rows, "decoding": len(p.decoding), "prefilling": len(p.prefilling),
                                  "kv_bytes": p.nbytes} for n, p in self._pools.items()},
                    "decode_steps": self.steps}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- scheduler thread
    def _run(self, threads: int) -> None:
        # This thread's OpenMP team should be the only one in the process: model loads and merges run in threads
        # that exit (engine.threads), since a second team makes libgomp stop spinning and slows decode by ~25%.
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not any(p.busy for p in self._pools.values()):
                    self._cv.wait()
                if self._closed:
                    break
                try:
                    self._admit()
                except Exception:  # e.g. out of memory for a new pool: those requests wait, the thread lives on
                    logger.exception("admitting requests failed")
                pools = [p for p in self._pools.values() if p.busy]
            for pool in pools:
                try:
                    with pool.lm.lock:  # merge/unmerge of this base's weights waits for the step
                        if pool.prefilling:
                            self._prefill_chunk(pool)
                        if pool.decoding:
                            self._decode_step(pool)
                except Exception as e:  # fail this pool's requests, keep serving the rest
                    logger.exception("forward pass failed for %s", pool.lm.name)
                    self._fail_pool(pool, e)
        self._shutdown()

    def _admit(self) -> None:
        """Move waiting requests into free rows. Holds ``_cv``.

        A pool prefills one request at a time in chunks, or several together in one forward pass when each of their
        prompts fits the pass's token budget and padding them to the longest wastes at most 1/4 of it (requests
        that arrive together, a burst of chats, start decoding together).
        """
        kept: deque[Handle] = deque()
        while self._waiting:
            h = self._waiting.popleft()
            if h.cancelled:
                self._finish_unstarted(h)
                continue
            pool = self._pools.get(h.request.lm.name)
            if pool is not None and pool.lm is not h.request.lm:  # the base was reloaded: new pool when idle
                if pool.busy:
                    kept.append(h)
                    continue
                del self._pools[pool.lm.name]
                pool = None
            if pool is None:
                try:
                    pool = self._new_pool(h.request.lm)
                except Exception as e:  # e.g. no memory for the KV cache: this request fails, others go on
                    logger.exception("could not allocate a KV pool for %s", h.request.lm.name)
                    h.error = EngineError(f"could not allocate the KV cache: {type(e).__name__}: {e}")
                    h.end_stream()
                    continue
                if pool is None:
                    kept.append(h)
                    continue
            if self._joins(pool, h):
                try:
                    self._start(pool, h)
                except Exception as e:  # a bad request (e.g. a seed out of range) fails alone
                    if pool.prefilling and pool.prefilling[-1].handle is h:
                        pool.prefilling.pop()
                    h.error = e if isinstance(e, EngineError) else EngineError(f"bad request: {e}")
                    h.end_stream()
            else:
                kept.append(h)
        self._waiting = kept

    def _budget(self, pool: _Pool) -> int:
        """Prompt tokens (padding included) of one prefill pass: alone on the model, big chunks (bounded, for
        activation memory); otherwise small ones so that decoding rows keep moving."""
        return 4 * self.prefill_chunk if not pool.decoding else self.prefill_chunk

    def _joins(self, pool: _Pool, h: Handle) -> bool:
        """Whether ``h`` can start prefilling now: alone, or with the requests already prefilling as one pass."""
        if len(pool.decoding) + len(pool.prefilling) >= pool.max_rows:
            return False
        if not pool.prefilling:
            return True
        r = h.request
        rest = [len(a.req.prompt_ids) - a.prefilled for a in pool.prefilling] + [len(r.prompt_ids) - _cached(r)]
        starts = [a.prefilled for a in pool.prefilling] + [_cached(r)]
        longest = max(rest)
        return len(rest) * longest <= self._budget(pool) and sum(rest) >= 0.75 * len(rest) * longest \
            and max(starts) + longest <= pool.cache.max_seq_len

    def _new_pool(self, lm: LoadedModel) -> _Pool | None:
        seq = self.context_length(lm)
        per_row = KVCache.bytes_per_token(lm.config, lm.dtype) * seq
        used = sum(p.nbytes for p in self._pools.values())
        if used + per_row > self.kv_memory:  # drop idle pools to make room
            for name, p in list(self._pools.items()):
                if not p.busy:
                    used -= p.nbytes
                    del self._pools[name]
        rows = min(self.max_batch, (self.kv_memory - used) // per_row)
        if rows < 1:
            if not self._pools:  # a single row is over budget: serve it anyway rather than hang
                rows = 1
                logger.warning("one KV row of %s (%d bytes) exceeds SCRATCHCHAT_KV_MEMORY", lm.name, per_row)
            else:
                return None
        pool = _Pool(lm, int(rows), seq)
        self._pools[lm.name] = pool
        logger.info("KV pool for %s: %d rows x %d tokens (%.1f MB)", lm.name, rows, seq, pool.nbytes / 2**20)
        return pool

    def _start(self, pool: _Pool, h: Handle) -> None:
        act = _Active(h)
        row = len(pool.decoding) + len(pool.prefilling)
        r = h.request
        n = _cached(r)
        if n > 0:  # only the reused part (copy_row_ would copy the whole stored prefix)
            pool.cache.copy_positions_(row, r.prefix, 0, n)
        pool.cache.lengths[row] = n
        act.prefilled = n
        pool.prefilling.append(act)

    def _prefill_chunk(self, pool: _Pool) -> None:
        """One prefill pass: the next chunk of a lone prefilling request, or the whole prompts of a group (each
        row's tokens padded on the right to the longest; the padding's keys land past the row's length and are
        overwritten later). Requests whose prompt is done start decoding with their first token."""
        for k in range(len(pool.prefilling) - 1, -1, -1):  # cancelled before their pass: free their rows
            if pool.prefilling[k].handle.cancelled:
                self._drop_prefilling(pool, k)
        group = pool.prefilling
        if not group:
            return
        A = len(pool.decoding)
        cache = pool.cache.rows(A, A + len(group))
        if len(group) == 1:
            act = group[0]
            piece = act.req.prompt_ids[act.prefilled : act.prefilled + self._budget(pool)]
            logits = pool.lm.model(torch.tensor([piece], dtype=torch.long), cache=cache,
                                   lora=pool.prefill_hook(act.req.adapter), last_only=True)[:, -1]
            act.prefilled += len(piece)
            if act.prefilled < len(act.req.prompt_ids):
                return
        else:  # the whole of every prompt in this pass (admission made sure it fits)
            pieces = [a.req.prompt_ids[a.prefilled :] for a in group]
            T = max(map(len, pieces))
            x = torch.zeros(len(group), T, dtype=torch.long)
            keep = torch.zeros(len(group), T, dtype=torch.bool)
            for i, piece in enumerate(pieces):
                x[i, : len(piece)] = torch.tensor(piece)
                keep[i, len(piece) - 1] = True  # logits at each row's last prompt token only
            hook = pool._build([a.req.adapter for a in group])
            logits = pool.lm.model(x, cache=cache, lora=hook, keep=keep)  # (rows, vocab)
            for i, (a, piece) in enumerate(zip(group, pieces, strict=True)):
                a.prefilled += len(piece)
                cache.lengths[i] = a.prefilled  # not the padded length
        pool.prefilling = []
        pool.decoding.extend(group)
        tokens = sample_rows(logits, [a.req.cfg for a in group], [a.generator for a in group],
                             [a.generated for a in group])[:, 0].tolist()
        for i in range(len(group) - 1, -1, -1):  # in reverse, as _decode_step: a removal moves no row not yet handled
            self._emit(pool, group[i], tokens[i], A + i)

    def _drop_prefilling(self, pool: _Pool, k: int) -> None:
        """End prefilling request ``k`` (cancelled) and close its row's gap."""
        act = pool.prefilling.pop(k)
        row = len(pool.decoding) + k
        for j in range(k, len(pool.prefilling)):  # the rows after it move down one
            pool.cache.copy_row_(row + j - k, pool.cache, row + j - k + 1)
        pool.cache.lengths[len(pool.decoding) + len(pool.prefilling)] = 0
        self._finish(pool, act, "cancelled", row=None)

    def _decode_step(self, pool: _Pool) -> None:
        # cancellations first: they return within one step and free their row before it is computed
        for i in range(len(pool.decoding) - 1, -1, -1):
            if pool.decoding[i].handle.cancelled:
                self._finish(pool, pool.decoding[i], "cancelled", row=i)
        rows = pool.decoding
        if not rows:
            return
        A = len(rows)
        x = torch.tensor([[a.next_token] for a in rows], dtype=torch.long)  # (A, 1)
        hook = pool.hook([a.req.adapter for a in rows])
        logits = pool.lm.model(x, cache=pool.cache.rows(0, A), lora=hook)  # (A, 1, vocab)
        self.steps += 1
        tokens = sample_rows(logits[:, -1], [a.req.cfg for a in rows], [a.generator for a in rows],
                             [a.generated for a in rows])[:, 0].tolist()
        # emit in reverse so that a finished row's removal never moves a row not yet handled
        for i in range(A - 1, -1, -1):
            self._emit(pool, rows[i], tokens[i], i)

    def _emit(self, pool: _Pool, act: _Active, token: int, row: int) -> None:
        """Account a sampled token of decoding row ``row``; finish the request if it ends here."""
        now = time.perf_counter()
        if act.t_first is None:
            act.t_first = now
        if token in act.stream.stop_ids:  # EOS: not part of the answer, never fed back
            self._finish(pool, act, "stop", row)
            return
        act.t_last = now
        act.generated.append(token)
        text = act.stream.push(token)
        act.handle._post(Delta(text, [token]))
        if act.stream.stopped:  # a stop string appeared
            self._finish(pool, act, "stop", row)
            return
        n_ctx = pool.cache.max_seq_len
        if len(act.generated) >= act.req.cfg.max_new_tokens or int(pool.cache.lengths[row]) >= n_ctx:
            self._finish(pool, act, "length", row)
            return
        act.next_token = token

    def _finish(self, pool: _Pool, act: _Active, reason: str, row: int | None) -> None:
        """End a request: hand back its cache, set its result, free its row (keeping decoding rows compact; only
        then does the pool read as not busy), post the last delta."""
        cache = None
        n = 0
        if row is not None:
            n = int(pool.cache.lengths[row])
            if act.req.keep_cache and n > 0:
                cache = pool.cache.extract_row(row)
        tail = act.stream.finish(reason)  # releases held-back text unless a stop string was found
        fed = (act.req.prompt_ids + act.generated)[:n]
        decode_s = (act.t_last - act.t_first) if act.t_first is not None and act.t_last is not None else 0.0
        n_dec = max(len(act.generated) - 1, 0)
        result = Result(
            finish_reason=reason, prompt_tokens=len(act.req.prompt_ids), completion_tokens=len(act.generated),
            cached_tokens=act.req.prefix_len if act.req.prefix is not None else 0,
            ttft_s=(act.t_first - act.t_submit) if act.t_first is not None else 0.0,
            decode_tokens_per_s=n_dec / decode_s if decode_s > 0 else 0.0, text=act.stream.text,
            token_ids=list(act.generated), cache=cache, cache_ids=fed if cache is not None else [],
        )
        act.handle.result = result
        if row is not None:
            self._remove_row(pool, row)
        usage = Usage(result.prompt_tokens, result.completion_tokens, result.ttft_s, result.decode_tokens_per_s,
                      reason)
        act.handle._post(Delta(tail, [], reason, usage))
        act.handle.end_stream()

    def _remove_row(self, pool: _Pool, row: int) -> None:
        rows = pool.decoding
        last = len(rows) - 1
        if row != last:  # move the last decoding row into the hole
            pool.cache.copy_row_(row, pool.cache, last)
            rows[row] = rows[last]
        rows.pop()
        pool.cache.lengths[last] = 0
        if pool.prefilling:  # the prefilling rows sit right after the decoding rows: the last one fills the gap
            end = last + len(pool.prefilling)
            pool.cache.copy_row_(last, pool.cache, end)
            pool.cache.lengths[end] = 0
            pool.prefilling.insert(0, pool.prefilling.pop())

    def _finish_unstarted(self, h: Handle) -> None:
        h.result = Result("cancelled", len(h.request.prompt_ids), 0, 0, 0.0, 0.0, "", [])
        h._post(Delta("", [], "cancelled", Usage(len(h.request.prompt_ids), 0, 0.0, 0.0, "cancelled")))
        h.end_stream()

    def _fail_pool(self, pool: _Pool, exc: Exception) -> None:
        err = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        acts = pool.decoding + pool.prefilling
        pool.decoding, pool.prefilling = [], []
        pool.cache.reset()
        for act in acts:
            act.handle.error = err
            act.handle.end_stream()

    def _shutdown(self) -> None:
        err = EngineError("the engine shut down")
        with self._cv:
            for h in self._waiting:
                h.error = err
                h.end_stream()
            self._waiting.clear()
            for pool in self._pools.values():
                self._fail_pool(pool, err)
