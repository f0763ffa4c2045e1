"""OpenAI-compatible HTTP API over the engine (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

The wire format follows OpenAI's API reference so that the official ``openai`` client (and anything built on it)
works unchanged: JSON bodies, Server-Sent Events for ``stream=true`` (``data: {chunk}`` lines, then
``data: [DONE]``), ``usage`` in responses (and in a last chunk with ``stream_options.include_usage``), and errors as
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status: unknown model 404, bad parameters
or a prompt over the context 400, busy 429, bad API key 401. ``top_k`` and ``repetition_penalty`` are accepted as
extensions (``extra_body`` in the client). Models are named ``base`` or ``base:adapter``.

:func:`build_router` gives the routes alone (the chat app mounts them next to Chainlit); :func:`build_app` wraps
them in an app for ``python -m engine serve``. Every request is validated inside its handler and answered with an
OpenAI-shaped error, so a bad request never disturbs the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import EngineError
from engine.sampling import GenerationConfig
from engine.sessions import Engine, split_model_name

logger = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None


class ChatBody(_Body):
    messages: list[dict[str, Any]]


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_engine(e: EngineError) -> ApiError:
    return ApiError(e.http_status, str(e), type=e.type, code=e.code, param="model" if e.http_status == 404 else None)


def _parse(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise ApiError(400, f"invalid request: {param}: {err.get('msg')}", param=param) from None


def _gen_config(engine: Engine, base: str, body: _Body) -> GenerationConfig:
    """The request's sampling settings over the model's defaults (ValueError -> 400 naming the parameter)."""
    defaults = engine.generation_defaults(base)
    over: dict[str, Any] = {}
    max_tokens = body.max_completion_tokens or body.max_tokens
    for key, value in (("max_new_tokens", max_tokens), ("temperature", body.temperature), ("top_p", body.top_p),
                       ("top_k", body.top_k), ("repetition_penalty", body.repetition_penalty),
                       ("frequency_penalty", body.frequency_penalty), ("presence_penalty", body.presence_penalty),
                       ("seed", body.seed)):
        if value is not None:
            over[key] = value
    if body.stop is not None:
        over["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if body.seed is not None and not -(2**63) <= body.seed < 2**64:
        raise ApiError(400, f"seed {body.seed} is out of range; use a 64-bit integer", param="seed")
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported; ask for one choice (n=1)", param="n")
    try:
        return GenerationConfig(**{**defaults.__dict__, **over})
    except ValueError as e:  # GenerationConfig's messages start with the field name
        field = str(e).split(" ", 1)[0]
        param = "max_tokens" if field == "max_new_tokens" else field
        raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens"), param=param) from None


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    if not raw:
        raise ApiError(400, "messages must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(raw):
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported; use system, user or assistant",
                           param=f"messages.{i}.role")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages.{i}.content")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "system" and len(out) == 1:
        raise ApiError(400, "messages holds only a system message; add a user message", param="messages")
    return out


def _usage(u: Any) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_router(engine: Engine, *, api_key: str | None = None) -> APIRouter:
    """The OpenAI-compatible routes under ``/v1`` for ``engine``; ``api_key`` enables a Bearer check."""
    router = APIRouter()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            check_key(request)
            models = await asyncio.to_thread(engine.list_models)
        except ApiError as e:
            return e.response()
        data = []
        for m in models:
            data.append({"id": m.name, "object": "model", "created": 0, "owned_by": "scratchchat"})
            data += [{"id": f"{m.name}:{a}", "object": "model", "created": 0, "owned_by": "scratchchat",
                      "parent": m.name} for a in m.adapters]
        return JSONResponse({"object": "list", "data": data})

    async def run(request: Request, chat: bool) -> Any:
        check_key(request)
        body = _parse(ChatBody if chat else CompletionBody, await read_json(request))
        base, adapter = split_model_name(body.model)
        try:
            cfg = await asyncio.to_thread(_gen_config, engine, base, body)
            if chat:
                ids = await asyncio.to_thread(engine.encode_chat, base, _messages(body.messages), adapter)
                stops = None  # the prompt format's own
            else:
                prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
                if isinstance(body.prompt, list) and len(body.prompt) != 1:
                    raise ApiError(400, "send one prompt per request", param="prompt")
                lm = await asyncio.to_thread(engine.load, base)
                ids = lm.tokenizer.encode(prompt)
                if not ids:
                    raise ApiError(400, "the prompt is empty", param="prompt")
                stops = ()  # raw completions stop only at EOS, max_tokens and the caller's stop strings
            loop = asyncio.get_running_loop()
            handle = await asyncio.to_thread(engine.submit, base, ids, cfg, adapter=adapter, loop=loop,
                                             stop_strings=stops)
        except ValueError as e:  # bad messages (roles, order) from the prompt format
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(handle, rid, created, body.model, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, usage, reason = [], None, None
        async for d in handle:
            parts.append(d.text)
            if d.finish_reason is not None:
                usage, reason = d.usage, d.finish_reason
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": _finish(reason)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": (prompt + text) if body.echo else text, "logprobs": None,
                      "finish_reason": _finish(reason)}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                             "choices": [choice], "usage": _usage(usage)})

    async def guarded(request: Request, chat: bool) -> Any:
        try:
            return await run(request, chat)
        except ApiError as e:
            return e.response()
        except EngineError as e:
            return _from_engine(e).response()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await guarded(request, True)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await guarded(request, False)

    return router


async def _stream(handle: Any, rid: str, created: int, model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

    try:
        if chat:
            yield _sse(chunk(None, None, first=True))
        async for d in handle:
            if d.finish_reason is not None:
                if d.text:
                    yield _sse(chunk(d.text, None))
                yield _sse(chunk(None, _finish(d.finish_reason)))
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                "usage": _usage(d.usage)})
            elif d.text:
                yield _sse(chunk(d.text, None))
    except EngineError as e:  # the stream has started: report in-band, as OpenAI does
        yield _sse(_from_engine(e).body())
    yield "data: [DONE]\n\n"


def build_app(engine: Engine | None = None, *, api_key: str | None = None) -> FastAPI:
    """A FastAPI app serving the OpenAI-compatible routes (``engine`` defaults to :meth:`Engine.default`)."""
    app = FastAPI(title="ScratchChat engine", version="0.1.0")
    app.include_router(build_router(engine or Engine.default(), api_key=api_key))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app

