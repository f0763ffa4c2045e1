"""What a caller hands the scheduler and gets back: :class:`Request`, its :class:`Handle` and its :class:`Result`.

A :class:`Handle` is a thread-safe stream of :class:`~engine.generate.Delta` s that the scheduler's thread fills and
the caller iterates, synchronously or with ``async for`` (deltas then arrive through the caller's event loop). It
is also the cancel switch: ``cancel()``, a ``should_stop`` callback that returns True, or a consumer that stops
iterating early all end the request within one decode step and free its row.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from engine.generate import Delta
from engine.kv_cache import KVCache
from engine.lora import LoraAdapter
from engine.registry import LoadedModel
from engine.sampling import GenerationConfig

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """A generation request for the scheduler (built by :mod:`engine.sessions` or the API).

    Attributes:
        lm: the loaded base model.
        adapter: the LoRA adapter for this request, or None.
        prompt_ids: the full prompt.
        cfg: sampling settings (max_new_tokens, temperature, ..., seed, stop).
        stop_ids: token ids that end the answer (not emitted).
        stop_strings: strings that end the answer (never partly streamed).
        should_stop: polled before every step; True cancels the request.
        prefix: optional batch-1 cache whose first ``prefix_len`` positions hold ``prompt_ids[:prefix_len]``.
        keep_cache: hand the request's KV cache back when it ends (for the next turn of a session).
    """

    lm: LoadedModel
    adapter: LoraAdapter | None
    prompt_ids: list[int]
    cfg: GenerationConfig
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    should_stop: Callable[[], bool] | None = None
    prefix: KVCache | None = None
    prefix_len: int = 0
    keep_cache: bool = False


@dataclass
class Result:
    """How a request ended."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the prefix instead of prefilled
    ttft_s: float
    decode_tokens_per_s: float
    text: str
    token_ids: list[int]
    cache: KVCache | None = None  # batch-1 cache of prompt + fed tokens (when keep_cache)
    cache_ids: list[int] = field(default_factory=list)  # the token ids that cache holds


_DONE = object()


class Handle:
    """The caller's side of a request: iterate it for :class:`Delta` s; ``result`` once it has ended."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self.t_submit = time.perf_counter()  # time to first token counts the wait in the queue too
        self.result: Result | None = None
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._loop = loop
        self._q: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """Ask the scheduler to end this request (within one decode step)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        if self._cancel.is_set():
            return True
        stop = self.request.should_stop
        if stop is not None:
            try:
                if stop():
                    self._cancel.set()
            except Exception:  # a broken callback must not kill the scheduler; treat it as "stop"
                logger.exception("should_stop raised; cancelling the request")
                self._cancel.set()
        return self._cancel.is_set()

    def end_stream(self) -> None:
        """Tell the consumer there are no more deltas (the scheduler calls this once, when the request ends)."""
        self._post(_DONE)

    def _post(self, item: object) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._q.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                self._cancel.set()
        else:
            self._q.put(item)

    def __iter__(self) -> Iterator[Delta]:
        try:
            while True:
                item = self._q.get()
                if item is _DONE:
                    break
                yield item
        finally:  # the consumer stopped early (closed generator): free the row
            if self.result is None and self.error is None:
                self.cancel()
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while True:
                item = await self._q.get()
                if item is _DONE:
                    break
                yield item
        finally:
            if self.result is None and self.error is None:
                self.cancel()
        if self.error is not None:
            raise self.error
