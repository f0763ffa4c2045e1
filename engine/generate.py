"""Generation: prefill, one decode step, the token iterator, and text streaming with stop strings.

Split like gpt-fast's generate.py (``prefill``, ``decode_one_token``) and layered like litgpt's generate/base.py
(an iterator of tokens; everything else is built on it):

* :func:`prefill` / :func:`decode_step`: one forward pass each, writing the pre-allocated KV cache in place.
* :func:`generate_tokens`: prefill once, then sample and decode one token per step. It never yields a stop id
  (EOS), checks ``should_stop()`` before every decode step (so a cancel returns within one step) and returns the
  finish reason (``"stop"``, ``"length"`` or ``"cancelled"``) as the generator's return value.
* :func:`generate_uncached`: recomputes the whole sequence every step (the book's ``generate``); the ``--no-cache``
  path and the benchmark's baseline.
* :class:`TextStream`: per request, turns token ids into text deltas with whole UTF-8 characters only
  (:class:`~engine.tokenizer.StreamDecoder`) and holds back any suffix that could start a stop string, so a stop
  string is never partly streamed.
* :func:`stream_generate` / :func:`astream_generate`: the two composed, yielding :class:`Delta` objects; the last
  one carries the finish reason and :class:`Usage`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVCache
from engine.model import GPT, LoraHook
from engine.sampling import GenerationConfig, build_generator, sample
from engine.tokenizer import StreamDecoder, Tokenizer

FINISH_REASONS = ("stop", "length", "cancelled")


def _as_ids(prompt_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty (T,) or (B, T) sequence of ids, got shape {tuple(ids.shape)}")
    return ids


@torch.inference_mode()
def prefill(model: GPT, ids: torch.Tensor, cache: KVCache, lora: LoraHook | None = None,
            chunk_size: int | None = None) -> torch.Tensor:
    """Run the prompt ``ids`` (B, T) through the model, appending its keys/values to ``cache``.

    Args:
        chunk_size: prefill at most this many tokens per forward pass (bounds activation memory).

    Returns:
        (B, V) logits for the position after the last prompt token.
    """
    step = chunk_size or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        logits = model(ids[:, start : start + step], cache=cache, lora=lora, last_only=True)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(model: GPT, token: torch.Tensor, cache: KVCache, lora: LoraHook | None = None) -> torch.Tensor:
    """Feed one new token per row, ``token`` (B, 1), and return the next logits (B, V)."""
    return model(token, cache=cache, lora=lora)[:, -1]


def _model_device_dtype(model: GPT) -> tuple[torch.device, torch.dtype]:
    p = model.tok_emb.weight
    return p.device, p.dtype


def generate_tokens(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: GenerationConfig,
    *,
    cache: KVCache | None = None,
    stop_ids: Sequence[int] = (),
    should_stop: Callable[[], bool] | None = None,
    lora: LoraHook | None = None,
) -> Generator[int, None, str]:
    """Yield generated token ids one at a time (batch 1, KV-cached).

    Args:
        model: the model, in eval mode.
        prompt_ids: the tokens to prefill. With a ``cache`` that already holds a prefix (a chat session's earlier
            turns), only the new tokens.
        cfg: sampling settings; ``cfg.seed`` seeds a generator private to this call.
        cache: a batch-1 cache to continue; by default one sized ``len(prompt) + max_new_tokens`` (capped at the
            context length) is built. On return it holds the prompt and every yielded token except the last.
        stop_ids: token ids that end generation and are never yielded (the model's EOS ids).
        should_stop: polled before prefill and before every decode step; True ends generation ("cancelled").
        lora: optional per-request LoRA hook.

    Returns:
        (as the generator's return value) the finish reason: "stop", "length" or "cancelled".

    Raises:
        ValueError: the prompt does not fit the context or the cache.
    """
    device, dtype = _model_device_dtype(model)
    ids = _as_ids(prompt_ids, device)
    if ids.shape[0] != 1:
        raise ValueError(f"generate_tokens is batch-1; got {ids.shape[0]} rows (use the scheduler for batches)")
    n_prompt = ids.shape[1]
    if cache is None:
        ctx = model.config.context_length
        if n_prompt > ctx:
            raise ValueError(f"prompt of {n_prompt} tokens exceeds the context length {ctx}")
        cache = KVCache.build(model.config, 1, min(n_prompt + cfg.max_new_tokens, ctx), device, dtype)
    elif cache.batch_size != 1:
        raise ValueError(f"generate_tokens needs a batch-1 cache, got {cache.batch_size} rows")
    start = int(cache.lengths[0])
    if start + n_prompt > cache.max_seq_len:
        raise ValueError(f"{start} cached + {n_prompt} prompt tokens exceed the cache size {cache.max_seq_len}")
    # The last sampled token is never fed back, so a full cache still allows one more token.
    limit = min(cfg.max_new_tokens, cache.max_seq_len - start - n_prompt + 1)
    return _generate(model, ids, cfg, cache, frozenset(int(i) for i in stop_ids), should_stop, lora, limit)


@torch.inference_mode()
def _generate(model: GPT, ids: torch.Tensor, cfg: GenerationConfig, cache: KVCache, stop_ids: frozenset[int],
              should_stop: Callable[[], bool] | None, lora: LoraHook | None, limit: int) -> Generator[int, None, str]:
    if should_stop is not None and should_stop():
        return "cancelled"
    generator = build_generator(cfg.seed, ids.device)
    generated: list[int] = []
    penalties = cfg.has_penalties
    logits = prefill(model, ids, cache, lora)
    for i in range(limit):
        token = sample(logits, cfg, generator, [generated] if penalties else None)  # (1, 1)
        t = int(token)
        if t in stop_ids:
            return "stop"
        yield t
        generated.append(t)
        if i + 1 == limit:
            break
        if should_stop is not None and should_stop():
            return "cancelled"
        logits = decode_step(model, token, cache, lora)
    return "length"


def generate_uncached(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: GenerationConfig,
    *,
    stop_ids: Sequence[int] = (),
    should_stop: Callable[[], bool] | None = None,
    lora: LoraHook | None = None,
) -> Generator[int, None, str]:
    """Like :func:`generate_tokens` but recomputes the full sequence every step (no KV cache).

    The sequence is cropped to its last ``context_length`` tokens, as the book's ``generate`` does; that shifts
    absolute positions once the context is full, which is why the cached path refuses to overflow instead.
    """
    device, _ = _model_device_dtype(model)
    ids = _as_ids(prompt_ids, device)
    return _generate_uncached(model, ids, cfg, frozenset(int(i) for i in stop_ids), should_stop, lora)


@torch.inference_mode()
def _generate_uncached(model: GPT, ids: torch.Tensor, cfg: GenerationConfig, stop_ids: frozenset[int],
                       should_stop: Callable[[], bool] | None, lora: LoraHook | None) -> Generator[int, None, str]:
    ctx = model.config.context_length
    generator = build_generator(cfg.seed, ids.device)
    generated: list[int] = []
    for _ in range(cfg.max_new_tokens):
        if should_stop is not None and should_stop():
            return "cancelled"
        logits = model(ids[:, -ctx:], lora=lora, last_only=True)[:, -1]
        token = sample(logits, cfg, generator, [generated] if cfg.has_penalties else None)
        t = int(token)
        if t in stop_ids:
            return "stop"
        yield t
        generated.append(t)
        ids = torch.cat([ids, token], dim=1)
    return "length"


class TextStream:
    """Token ids in, text deltas out, for one request.

    ``push(token_id)`` returns the text that is now safe to show: whole UTF-8 characters, minus any suffix that
    could be the beginning of a stop string. When a stop string appears, the text is cut just before it and the
    stream is stopped (``finish_reason == "stop"``); held text that turns out not to start a stop string is released
    by a later push or by :meth:`finish`.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = ()) -> None:
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self._decoder = StreamDecoder(tokenizer)
        self._pending = ""  # decoded but not yet released (a possible stop-string prefix)
        self._parts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._parts)

    def _release(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly releasable text ("" after the stream stopped)."""
        if self.stopped:
            return ""
        if token_id in self.stop_ids:
            return self.finish("stop")
        self.token_ids.append(token_id)
        pending = self._pending + self._decoder.push(token_id)
        if not self.stop_strings:
            self._pending = ""
            return self._release(pending)
        cut = min((i for i in (pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self.finish_reason = "stop"
            return self._release(pending[:cut])
        hold = self._held_suffix(pending)
        self._pending = pending[len(pending) - hold:] if hold else ""
        return self._release(pending[: len(pending) - hold])

    def finish(self, reason: str) -> str:
        """End the stream for ``reason`` ("stop", "length", "cancelled"); return the text still held back."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if self.stopped:
            return ""
        self.finish_reason = reason
        tail = self._pending + self._decoder.flush()
        self._pending = ""
        return self._release(tail)


@dataclass
class Usage:
    """Per-request accounting."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    """Seconds from the call to the first sampled token (prefill + one sample)."""
    decode_tokens_per_s: float = 0.0
    """Tokens per second after the first one (0 when fewer than two tokens were generated)."""
    finish_reason: str | None = None


@dataclass
class Delta:
    """A piece of streamed output. The last delta of a stream has ``finish_reason`` and ``usage`` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


def stream_generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: GenerationConfig,
    *,
    stop_strings: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache: KVCache | None = None,
    lora: LoraHook | None = None,
) -> Iterator[Delta]:
    """Generate and stream text deltas (one per token; text may be "" while a stop-string prefix is held).

    Args:
        stop_strings: stop strings (``cfg.stop`` is added); the text is cut before the first one found.
        stop_ids: ids that end generation; default ``tokenizer.eos_token_ids``.
        Other arguments as in :func:`generate_tokens`.

    Yields:
        :class:`Delta` per generated token, then a final one with ``finish_reason`` and ``usage``.
    """
    t0 = time.perf_counter()
    stop_ids = tuple(tokenizer.eos_token_ids if stop_ids is None else stop_ids)
    stream = TextStream(tokenizer, tuple(stop_strings) + tuple(cfg.stop))
    tokens = generate_tokens(model, prompt_ids, cfg, cache=cache, stop_ids=stop_ids, should_stop=should_stop,
                             lora=lora)
    usage = Usage(prompt_tokens=int(torch.as_tensor(prompt_ids).shape[-1]))
    t_first = t_last = None
    reason = "length"
    while True:
        try:
            token = next(tokens)
        except StopIteration as done:
            reason = done.value or "length"
            break
        t_last = time.perf_counter()
        if t_first is None:
            t_first = t_last
        usage.completion_tokens += 1
        text = stream.push(token)
        if stream.stopped:  # a stop string was found: end generation now
            tokens.close()
            yield Delta(text, [token])
            reason = "stop"
            break
        yield Delta(text, [token])
    tail = stream.finish(reason)
    usage.finish_reason = stream.finish_reason
    if t_first is not None:
        usage.ttft_s = t_first - t0
        if usage.completion_tokens > 1 and t_last > t_first:
            usage.decode_tokens_per_s = (usage.completion_tokens - 1) / (t_last - t_first)
    yield Delta(tail, [], usage.finish_reason, usage)


async def astream_generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: GenerationConfig,
    *,
    stop_strings: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache: KVCache | None = None,
    lora: LoraHook | None = None,
) -> AsyncIterator[Delta]:
    """Async version of :func:`stream_generate`: the blocking loop runs in a worker thread.

    Closing the iterator (``contextlib.aclosing`` around an ``async for`` that breaks, or cancelling the consuming
    task) sets a stop flag that the worker checks before its next decode step; the wrapper then waits for the worker
    to finish, so the model is free when it returns. A bare ``break`` without ``aclosing`` only closes the iterator
    when it is garbage-collected.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def stop_requested() -> bool:
        return cancel.is_set() or (should_stop is not None and should_stop())

    def work() -> None:
        try:
            for delta in stream_generate(model, tokenizer, prompt_ids, cfg, stop_strings=stop_strings,
                                         stop_ids=stop_ids, should_stop=stop_requested, cache=cache, lora=lora):
                loop.call_soon_threadsafe(queue.put_nowait, delta)
        except BaseException as exc:  # handed to the consumer and re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        await asyncio.shield(worker)
