"""The engine facade and chat sessions: what the chat app, the HTTP API and the CLI use.

:class:`Engine` bundles a :class:`~engine.registry.Registry` (loaded bases + adapters) and a
:class:`~engine.scheduler.Scheduler` (one thread, continuous batching). :class:`ChatSession` holds one conversation:
history, model, adapter, system prompt, and the KV cache of everything already prefilled. A turn encodes the whole
history in the model's prompt format and reuses the longest cached prefix, so only the new tokens are prefilled
(llama.cpp server's prompt cache, per session). The last answer stays in the ids the model sampled, not its text
re-encoded (:meth:`~engine.prompts.PromptFormat.encode_chat_reusing`): a sampled answer need not be BPE's
canonical split, and re-encoding it would prefill the whole answer again.

The cache is keyed by everything that changes the keys and values other than the tokens themselves: the base
(name, weights hash, manifest file stamp, dtype), the adapter and its version (file hash), whether an adapter is merged,
the prompt format and the system prompt. Any change discards it; this is the fix for reusing a prompt cache under
the wrong adapter (llama.cpp #26207, vLLM #42125). Sampling settings do not touch the cache.

Context overflow: when history + reply would not fit, the oldest whole turns are dropped (the system prompt stays)
and ``last_usage.truncated_turns`` says how many. Dropped turns stay out of later prompts, so the prompt is stable
and the cache stays reusable. A single message that alone does not fit raises :class:`ContextTooLong`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import ContextTooLong, EngineError
from engine.generate import Delta, Usage
from engine.kv_cache import KVCache
from engine.lora import LoraAdapter
from engine.prompts import PromptFormat, get_prompt_format
from engine.registry import LoadedModel, Registry
from engine.requests import Handle, Request
from engine.sampling import GenerationConfig
from engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

DEFAULT_SESSION_CACHE_MEMORY = 1 << 30  # bytes of KV cache kept by idle chat sessions, all together


@dataclass
class ModelInfo:
    """A model in the store, as listed to users."""

    name: str
    family: str
    prompt_format: str
    num_parameters: int
    dtype: str
    adapters: list[str]
    created_from: dict | None


@dataclass
class ChatUsage(Usage):
    """:class:`~engine.generate.Usage` of one turn plus what served it."""

    model: str = ""
    adapter: str | None = None
    truncated_turns: int = 0
    """Oldest history turns left out of this prompt to fit the context (0 when none)."""
    cached_tokens: int = 0
    """Prompt tokens reused from the session's KV cache instead of prefilled."""


TRIM_TO = 0.75  # a conversation that outgrows the context drops its oldest turns down to this share of it


def split_model_name(spec: str) -> tuple[str, str | None]:
    """``"base:adapter"`` -> ``("base", "adapter")``; ``"base"`` -> ``("base", None)``."""
    base, sep, adapter = spec.partition(":")
    return base, (adapter or None) if sep else None


class Engine:
    """Process-wide serving object: registry + scheduler. Use :meth:`default` for the shared one.

    Args:
        root: models dir (default ``$CHAT_MODELS_DIR`` or ./models).
        registry, scheduler: pre-built parts (tests); otherwise built from the other arguments.
        dtype: serving dtype (default: bf16 on CPUs with fast bf16, else fp32; ``$SCRATCHCHAT_DTYPE``).
        **scheduler_kwargs: passed to :class:`~engine.scheduler.Scheduler` (max_batch, max_queue, kv_memory, ...).
    """

    _default: Engine | None = None
    _default_lock = threading.Lock()

    def __init__(self, root: str | Path | None = None, *, registry: Registry | None = None,
                 scheduler: Scheduler | None = None, dtype: Any = None, memory_cap: int | None = None,
                 session_cache_memory: int | None = None, **scheduler_kwargs: Any) -> None:
        self.registry = registry or Registry(root, memory_cap=memory_cap, dtype=dtype)
        self.scheduler = scheduler or Scheduler(**scheduler_kwargs)
        self.registry.is_busy = self.scheduler.is_busy
        self.registry.on_evict = self.scheduler.release
        env = os.environ.get("SCRATCHCHAT_SESSION_CACHE_MEMORY")
        self.session_cache_memory = session_cache_memory or int(env or DEFAULT_SESSION_CACHE_MEMORY)
        # idle sessions' KV caches, least recently used first: id(session) -> (weakref, bytes)
        self._session_caches: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()
        self._caches_lock = threading.Lock()

    def _keep_session_cache(self, session: ChatSession, nbytes: int) -> None:
        """Account a session's kept cache; drop the least recently used others' over the budget (they are simply
        re-prefilled on their next turn)."""
        with self._caches_lock:
            self._session_caches.pop(id(session), None)
            self._session_caches[id(session)] = (weakref.ref(session), nbytes)
            total = 0
            for key, (ref, n) in list(self._session_caches.items())[::-1]:  # newest first
                other = ref()
                if other is None or other._cache is None:
                    del self._session_caches[key]
                    continue
                total += n
                if total > self.session_cache_memory and other is not session:
                    other._cache = None
                    total -= n
                    del self._session_caches[key]

    def session_cache_bytes(self) -> int:
        """Bytes held by idle sessions' KV caches."""
        with self._caches_lock:
            return sum(n for ref, n in self._session_caches.values() if ref() is not None and ref()._cache)

    @classmethod
    def default(cls) -> Engine:
        """The process-wide engine (created on first use)."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def close(self) -> None:
        self.scheduler.close()

    # ---- models
    def list_models(self) -> list[ModelInfo]:
        """Every model in the store with its adapters (re-read on each call)."""
        out = []
        for m in self.registry.list_models():
            out.append(ModelInfo(
                name=m["name"], family=m.get("family", ""), prompt_format=m.get("prompt_format", "none"),
                num_parameters=int(m.get("num_parameters") or 0), dtype=m.get("dtype", ""),
                adapters=self.registry.list_adapters(m["name"]), created_from=m.get("created_from")))
        return out

    def list_adapters(self, base: str) -> list[str]:
        return self.registry.list_adapters(base)

    def load(self, model: str) -> LoadedModel:
        """The loaded base ``model`` (UnknownModel / ModelLoadError on failure)."""
        return self.registry.get(model)

    def adapter(self, model: str | LoadedModel, adapter: str | None) -> LoraAdapter | None:
        """The loaded adapter (UnknownModel / AdapterMismatch on failure), or None."""
        return None if adapter is None else self.registry.get_adapter(model, adapter)

    def unload_adapter(self, model: str, adapter: str) -> None:
        """Drop a loaded adapter (it is reloaded from disk on next use)."""
        self.registry.unload_adapter(model, adapter)

    def merge_adapter(self, model: str, adapter: str) -> None:
        """Fold ``adapter`` into ``model``'s weights for maximum speed with it; other requests still get their own
        adapter (or none) by subtracting it. Sessions' caches on that model are rebuilt on their next turn."""
        self.registry.merge(model, adapter)

    def unmerge_adapter(self, model: str) -> None:
        """Restore ``model``'s original weights exactly."""
        self.registry.unmerge(model)

    def prompt_format(self, model: str | LoadedModel, adapter: str | LoraAdapter | None = None) -> PromptFormat:
        """The prompt format a request uses: the adapter's own (``scratchchat.json`` ``prompt_format``, the
        format it was trained with) when it names one, else the base model's."""
        lm = model if isinstance(model, LoadedModel) else self.load(model)
        ad = adapter if isinstance(adapter, LoraAdapter) or adapter is None else self.adapter(lm, adapter)
        name = ad.meta.get("prompt_format") if ad is not None else None
        if not name or name == lm.prompt_format.name:
            return lm.prompt_format
        try:
            return get_prompt_format(name)
        except (KeyError, ValueError):
            logger.warning("adapter %s names unknown prompt format %r; using %s's", ad.name, name, lm.name)
            return lm.prompt_format

    def generation_defaults(self, model: str) -> GenerationConfig:
        """Sampling defaults from the manifest's ``generation`` dict (unknown keys are ignored with a warning)."""
        gen = dict(self.registry.read_manifest(model).get("generation") or {})
        known = {f.name for f in fields(GenerationConfig)}
        for key in sorted(set(gen) - known):
            logger.warning("model %s: ignoring unknown generation setting %r", model, key)
            gen.pop(key)
        try:
            return GenerationConfig.from_dict(gen)
        except ValueError as e:
            logger.warning("model %s: bad generation defaults (%s); using the built-in ones", model, e)
            return GenerationConfig()

    def context_length(self, model: str | LoadedModel) -> int:
        """Tokens a request (prompt + answer) may hold on ``model`` here."""
        lm = model if isinstance(model, LoadedModel) else self.load(model)
        return self.scheduler.context_length(lm)

    def new_session(self, model: str, adapter: str | None = None, system_prompt: str | None = None) -> ChatSession:
        """A new chat on ``model`` (loads it now, so load errors surface here)."""
        return ChatSession(self, model, adapter=adapter, system_prompt=system_prompt)

    # ---- one-shot requests (API, CLI)
    def submit(self, model: str, prompt_ids: Sequence[int], cfg: GenerationConfig, *, adapter: str | None = None,
               should_stop: Callable[[], bool] | None = None, loop: asyncio.AbstractEventLoop | None = None,
               stop_strings: Sequence[str] | None = None) -> Handle:
        """Queue a raw token prompt; iterate the returned handle for deltas (the last one has usage).

        Raises:
            ContextTooLong: the prompt alone fills the context.
            EngineBusy: the queue is full.
        """
        lm = self.load(model)
        ad = self.adapter(lm, adapter)
        n_ctx = self.context_length(lm)
        if len(prompt_ids) >= n_ctx:
            raise ContextTooLong(f"the prompt is {len(prompt_ids)} tokens but {model!r} holds {n_ctx} tokens of "
                                 f"context here (prompt + answer); shorten it")
        stops = tuple(self.prompt_format(lm, ad).stop_strings if stop_strings is None else stop_strings)
        req = Request(lm=lm, adapter=ad, prompt_ids=list(prompt_ids), cfg=cfg, stop_ids=lm.tokenizer.eos_token_ids,
                      stop_strings=stops, should_stop=should_stop)
        return self.scheduler.submit(req, loop)

    def encode_chat(self, model: str, messages: Sequence[dict], adapter: str | None = None) -> list[int]:
        """A chat (OpenAI-style messages) in the prompt format of the model (or adapter), ready for the reply."""
        lm = self.load(model)
        fmt = self.prompt_format(lm, adapter)
        return fmt.encode_chat(list(messages), lm.tokenizer, add_generation_prompt=True)


@dataclass
class _SessionCache:
    key: tuple
    cache: KVCache
    ids: list[int] = field(default_factory=list)


class ChatSession:
    """One conversation: history, model, adapter, system prompt and a reusable KV cache.

    ``history`` is a list of ``{"role": "user"|"assistant", "content": str}``; the system prompt is kept apart
    (``None`` means the model's default from its manifest, ``""`` means none).
    """

    def __init__(self, engine: Engine, model: str, adapter: str | None = None,
                 system_prompt: str | None = None) -> None:
        self.engine = engine
        lm = engine.load(model)
        engine.adapter(lm, adapter)  # fail now (UnknownModel / AdapterMismatch), not at the first message
        self._model = model
        self._adapter = adapter
        self._system_prompt = system_prompt
        self.history: list[dict[str, str]] = []
        self.last_usage: ChatUsage | None = None
        self._first_turn = 0  # history[2 * _first_turn:] is what the prompt holds (older turns were dropped)
        self._cache: _SessionCache | None = None
        self._pending_key: tuple = ()
        self._busy = threading.Lock()

    # ---- settings
    @property
    def model(self) -> str:
        return self._model

    @property
    def adapter(self) -> str | None:
        return self._adapter

    @property
    def system_prompt(self) -> str | None:
        """The system prompt in effect (the model's default when none was set)."""
        if self._system_prompt is not None:
            return self._system_prompt or None
        return self.engine.registry.read_manifest(self._model).get("system_prompt") or None

    def set_adapter(self, name: str | None) -> None:
        """Switch the adapter (None = base only). History stays; the KV cache is rebuilt on the next turn."""
        if name is not None:
            self.engine.adapter(self._model, name)  # load/validate now so the caller sees the error
        self._adapter = name

    def set_system_prompt(self, text: str | None) -> None:
        self._system_prompt = text

    def reset(self) -> None:
        """Forget the history and the cache."""
        self.history.clear()
        self._first_turn = 0
        self._cache = None

    # ---- a turn
    def _prepare(self, user_text: str, cfg: GenerationConfig,
                 should_stop: Callable[[], bool] | None) -> tuple[Request, int, int, tuple]:
        """Encode the turn (dropping the oldest turns if needed) and find the reusable cached prefix.

        Returns (request, turns dropped now, first turn kept, cache key); the session's state changes only once
        the request is accepted (see :meth:`_submitted`)."""
        lm = self.engine.load(self._model)
        ad = self.engine.adapter(lm, self._adapter)
        fmt, tok = self.engine.prompt_format(lm, ad), lm.tokenizer
        # the manifest's default system prompt belongs to the base's format; an adapter trained on another format
        # gets that format's own default (e.g. Alpaca's preamble) unless a system prompt was set explicitly
        system = self.system_prompt if self._system_prompt is not None or fmt is lm.prompt_format else None
        n_ctx = self.engine.context_length(lm)
        reserve = min(cfg.max_new_tokens, n_ctx // 4)  # room kept for the answer when trimming history
        head = [{"role": "system", "content": system}] if system else []
        user = [{"role": "user", "content": user_text}]
        n_turns = len(self.history) // 2  # history holds (user, assistant) pairs
        first = kept = min(self._first_turn, n_turns)  # turns dropped once stay dropped: the prompt stays stable
        while True:
            messages = head + self.history[2 * first:] + user
            ids = fmt.encode_chat(messages, tok, add_generation_prompt=True)
            need = len(ids) + reserve
            # once turns must go, drop down to TRIM_TO of the context: a drop changes everything after the system
            # prompt (absolute positions cannot shift under a GPT-2 cache), so dropping one turn at a time would
            # re-prefill the whole history on every turn from then on; this way the next turns reuse the cache
            if (need <= n_ctx and (first == kept or need <= TRIM_TO * n_ctx)) or first >= n_turns:
                break
            first += 1
        if len(ids) >= n_ctx:
            raise ContextTooLong(
                f"this message needs {len(ids)} tokens with the system prompt, but {self._model!r} holds {n_ctx} "
                f"tokens of context here; shorten the message")
        truncated = first - min(self._first_turn, n_turns)

        merged = lm.merged.adapter.key if lm.merged is not None else None
        # the same files in the same dtype give the same keys/values, so a base evicted and reloaded keeps caches
        key = (lm.name, lm.sha256, lm.stamp, str(lm.dtype), None if ad is None else ad.key, merged, fmt.name, system)
        prefix, prefix_len = None, 0
        if self._cache is not None and self._cache.key == key:
            n = 0
            for a, b in zip(self._cache.ids, ids):
                if a != b:
                    break
                n += 1
            # the cache holds the last answer as sampled; its text re-encoded may split differently, and keeping
            # the sampled ids then saves prefilling everything after the first difference (same text either way)
            spliced, kept = fmt.encode_chat_reusing(messages, tok, self._cache.ids, add_generation_prompt=True)
            if kept > n and (len(spliced) <= len(ids) or len(spliced) + reserve <= n_ctx):  # no less room
                ids, n = spliced, kept
            prefix_len = min(n, len(ids) - 1)  # at least one token must be prefilled to get logits
            if prefix_len > 0:
                prefix = self._cache.cache
            else:
                prefix_len = 0
        req = Request(lm=lm, adapter=ad, prompt_ids=ids, cfg=cfg, stop_ids=tok.eos_token_ids,
                      stop_strings=tuple(fmt.stop_strings), should_stop=should_stop, prefix=prefix,
                      prefix_len=prefix_len, keep_cache=True)
        return req, truncated, first, key

    def _submitted(self, first: int, key: tuple) -> None:
        self._first_turn = first
        self._pending_key = key
        if self._cache is not None and self._cache.key != key:
            self._cache = None  # anything that changes keys/values (adapter, format, system...) discards it

    def _finish(self, handle: Handle, user_text: str, truncated: int, final: Delta) -> ChatUsage:
        res = handle.result
        if res.cache is not None:
            self._cache = _SessionCache(self._pending_key, res.cache, res.cache_ids)
            self.engine._keep_session_cache(self, res.cache.nbytes)
        self.history.append({"role": "user", "content": user_text})
        self.history.append({"role": "assistant", "content": res.text})
        u = final.usage
        self.last_usage = ChatUsage(
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, ttft_s=u.ttft_s,
            decode_tokens_per_s=u.decode_tokens_per_s, finish_reason=u.finish_reason, model=self._model,
            adapter=self._adapter, truncated_turns=truncated, cached_tokens=res.cached_tokens)
        return self.last_usage

    def stream(self, user_text: str, cfg: GenerationConfig | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[Delta]:
        """Answer ``user_text``: yields deltas (text, token_ids); the last one carries finish_reason and usage.

        On return, ``history`` holds the user message and the answer (partial when cancelled) and ``last_usage``
        is set. Leaving the loop early cancels the request.
        """
        if not self._busy.acquire(blocking=False):
            raise EngineError("this chat is already generating an answer; wait for it or stop it first")
        try:
            cfg = cfg or self.engine.generation_defaults(self._model)
            req, truncated, first, key = self._prepare(user_text, cfg, should_stop)
            handle = self.engine.scheduler.submit(req)
            self._submitted(first, key)
            for delta in handle:
                if delta.finish_reason is not None:
                    self._finish(handle, user_text, truncated, delta)
                    delta.usage = self.last_usage
                yield delta
        finally:
            self._busy.release()

    async def astream(self, user_text: str, cfg: GenerationConfig | None = None,
                      should_stop: Callable[[], bool] | None = None) -> AsyncIterator[Delta]:
        """Async :meth:`stream` (the event loop never blocks on the model; loading runs in a worker thread)."""
        if not self._busy.acquire(blocking=False):
            raise EngineError("this chat is already generating an answer; wait for it or stop it first")
        try:
            cfg = cfg or await asyncio.to_thread(self.engine.generation_defaults, self._model)
            req, truncated, first, key = await asyncio.to_thread(self._prepare, user_text, cfg, should_stop)
            handle = self.engine.scheduler.submit(req, asyncio.get_running_loop())
            self._submitted(first, key)
            async for delta in handle:
                if delta.finish_reason is not None:
                    self._finish(handle, user_text, truncated, delta)
                    delta.usage = self.last_usage
                yield delta
        finally:
            self._busy.release()

    def complete(self, user_text: str, cfg: GenerationConfig | None = None) -> str:
        """The whole answer as one string."""
        return "".join(d.text for d in self.stream(user_text, cfg))

