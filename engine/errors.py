"""Errors the serving half of the engine raises to its callers (chat app, HTTP API, CLI).

Every error subclasses :class:`EngineError` and carries a message a user can read and act on. The HTTP API maps
them to OpenAI-style JSON errors through ``http_status`` and ``code``; the chat app shows ``str(error)``.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a user-readable failure of the engine. The engine keeps serving after it."""

    http_status = 500
    code = "engine_error"
    type = "server_error"


class EngineBusy(EngineError):
    """The request queue is full (or the KV-cache memory bound is reached); retry shortly."""

    http_status = 429
    code = "engine_busy"
    type = "rate_limit_error"


class ContextTooLong(EngineError):
    """A single prompt does not fit the model's context window even after dropping the history."""

    http_status = 400
    code = "context_length_exceeded"
    type = "invalid_request_error"


class ModelLoadError(EngineError):
    """A model in the store could not be loaded (bad files, shapes, missing tokenizer, ...)."""

    http_status = 500
    code = "model_load_error"
    type = "server_error"


class AdapterMismatch(EngineError):
    """A LoRA adapter does not fit the base it was asked to run on (another base, or tensor shapes differ)."""

    http_status = 400
    code = "adapter_mismatch"
    type = "invalid_request_error"


class UnknownModel(EngineError):
    """No such model (or adapter) in the store."""

    http_status = 404
    code = "model_not_found"
    type = "invalid_request_error"
