"""The chat front end's plain helpers: everything `chat_app.py` needs that does not need Chainlit.

It holds the text the chat shows (model descriptions, the footer under each answer, engine errors, the hint when the
store is empty), the settings panel's values turned into the engine's GenerationConfig, which model a chat opens on
and which two models Compare sets side by side, streaming one answer with Stop (a threading.Event the engine reads),
and the plumbing that puts the engine's OpenAI-compatible routes and an offline index page on Chainlit's FastAPI app.
It is a module of its own so that `chat_app.py` stays the Chainlit handlers alone (STYLE.md section 1: chat_app.py
alone imports chainlit) and so that all of this can be imported and tested without Chainlit or a Chainlit context.
It imports nothing from chainlit; the arrows stay `chat_app.py -> chat_support.py -> engine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.errors import EngineError
    from engine.sampling import GenerationConfig
    from engine.sessions import ChatSession, ChatUsage, ModelInfo

FETCH_COMMAND = "python -m weights fetch smollm2-135m-instruct"
CATCH_ALL = "/{full_path:path}"  # the path of Chainlit's UI route, which matches every GET

Side = tuple[str, str | None]  # (model, adapter) of one Compare side

# ---------------------------------------------------------------------------------------------------------------
# what the chat shows


def format_params(n: int | None) -> str:
    """A parameter count, short.

    Args:
        n: the number of parameters; None or 0 when unknown.

    Returns:
        '124M' for 124439808, '1.5B' for 1_500_000_000, '?' when unknown.
    """
    if not n:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{round(n / 1e6)}M"


def describe_model(info: ModelInfo) -> str:
    """One markdown paragraph about a model, for its chat profile and the welcome message.

    Args:
        info: the model as the engine lists it (a ModelInfo, or anything with its fields).

    Returns:
        Name, family, size, prompt format and dtype; then the base it was finetuned from and its adapters, if any.
    """
    parts = [f"**{info.name}**: {info.family}, {format_params(info.num_parameters)} parameters, "
             f"prompt format `{info.prompt_format}`, stored as {info.dtype}."]
    created_from = getattr(info, "created_from", None)
    if created_from:
        parts.append(f"Finetuned from `{created_from.get('name', '?')}`.")
    adapters = list(getattr(info, "adapters", []) or [])
    if adapters:
        parts.append("Adapters: " + ", ".join(f"`{a}`" for a in adapters) + ".")
    return " ".join(parts)


def base_of(info: ModelInfo) -> str | None:
    """The model a full finetune was made from.

    Args:
        info: the model as the engine lists it.

    Returns:
        Its manifest's created_from.name, or None for a base model.
    """
    created_from = getattr(info, "created_from", None)
    return created_from.get("name") if isinstance(created_from, dict) else None


def footer(usage: ChatUsage, *, stopped: bool = False) -> str:
    """The italic line under each answer.

    Args:
        usage: the turn's accounting (the session's last_usage).
        stopped: the user pressed Stop during this answer.

    Returns:
        Model (+ adapter), prompt/completion tokens, tokens/s, time to first token, and why the answer ended early
        (stopped, max new tokens) or lost history turns, joined by ' · '.
    """
    model = getattr(usage, "model", None) or "?"
    adapter = getattr(usage, "adapter", None)
    who = f"{model} + adapter {adapter}" if adapter else f"{model} (no adapter)"
    bits = [who, f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"]
    tps = getattr(usage, "decode_tokens_per_s", None)
    if tps:
        bits.append(f"{tps:.1f} tokens/s")
    ttft = getattr(usage, "ttft_s", None)
    if ttft is not None:
        bits.append(f"first token {ttft:.2f} s")
    finish = getattr(usage, "finish_reason", None)
    if stopped or finish == "cancelled":
        bits.append("stopped by the user")
    elif finish == "length":
        bits.append("hit max new tokens")
    dropped = getattr(usage, "truncated_turns", 0) or 0
    if dropped:
        bits.append(f"{dropped} oldest turn(s) dropped to fit the context")
    return "*" + " · ".join(bits) + "*"


_ERROR_TITLES = {  # EngineError subclass name -> what the user reads first
    "ContextTooLong": "Message too long for the model's context",
    "EngineBusy": "The engine is busy",
    "ModelLoadError": "The model failed to load",
    "AdapterMismatch": "This adapter does not fit the model",
    "UnknownModel": "Not in the model store",
}


def describe_error(e: EngineError) -> str:
    """An engine error as the chat shows it.

    Args:
        e: the error the engine raised.

    Returns:
        '**Title:** the engine's own message', the title picked by the error's class.
    """
    title = _ERROR_TITLES.get(type(e).__name__, "The engine could not answer")
    return f"**{title}:** {e}"


def no_model_text() -> str:
    """The hint shown when the store holds no model: where the store is and the command that fetches the default.

    Returns:
        Markdown with the models dir ($CHAT_MODELS_DIR or ./models) and FETCH_COMMAND in a code block.
    """
    root = _models_dir_hint()
    return (f"No model in the store{root}. Fetch the default model, then reload this page:\n\n"
            f"```\n{FETCH_COMMAND}\n```")


def _models_dir_hint() -> str:
    return f" (`{os.environ['CHAT_MODELS_DIR']}`)" if os.environ.get("CHAT_MODELS_DIR") else " (`./models`)"


# ---------------------------------------------------------------------------------------------------------------
# settings, model choice, Compare


def parse_seed(value: Any) -> int | None:
    """The seed widget's value as a seed.

    Args:
        value: what the widget holds (int, float, str or None).

    Returns:
        A non-negative int, or None (random) for empty, negative or unparsable values.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seed = int(float(value))
    except (TypeError, ValueError):
        return None
    return seed if seed >= 0 else None


def build_generation_config(defaults: GenerationConfig, settings: dict[str, Any]) -> GenerationConfig:
    """The model's generation defaults with the settings panel applied.

    Args:
        defaults: the model's GenerationConfig (engine.generation_defaults).
        settings: the panel's values by widget id; missing ids keep the default. top_k 0 means off, greedy forces
            temperature 0 (argmax in engine.sampling).

    Returns:
        A new GenerationConfig.

    Raises:
        ValueError: the config rejects a value (e.g. max_new_tokens 0); TypeError or ValueError for unparsable ones.
    """
    changes: dict[str, Any] = {}
    if "temperature" in settings:
        changes["temperature"] = float(settings["temperature"])
    if "top_k" in settings:
        top_k = int(settings["top_k"])
        changes["top_k"] = top_k if top_k > 0 else None
    if "top_p" in settings:
        changes["top_p"] = float(settings["top_p"])
    if "max_new_tokens" in settings:
        changes["max_new_tokens"] = int(settings["max_new_tokens"])
    if "repetition_penalty" in settings:
        changes["repetition_penalty"] = float(settings["repetition_penalty"])
    if "seed" in settings:
        changes["seed"] = parse_seed(settings["seed"])
    if settings.get("greedy"):
        changes["temperature"] = 0.0  # temperature 0 = argmax in engine.sampling
    return dataclasses.replace(defaults, **changes)


def settings_values(widgets: list) -> dict[str, Any]:
    """The values a freshly sent settings panel holds (what Chainlit's ChatSettings.send() returns).

    Args:
        widgets: the panel's input widgets (anything with `id` and `initial`).

    Returns:
        Each widget's initial value by its id.
    """
    return {w.id: w.initial for w in widgets}


def choose_model(models: list[ModelInfo], name: str | None, default: str) -> ModelInfo | None:
    """The model a chat opens on.

    Args:
        models: the models in the store.
        name: the chat profile the user picked, if any.
        default: the model to use when `name` is not in the store.

    Returns:
        The model named `name`, else the one named `default`, else the first one; None if the store is empty.
    """
    if not models:
        return None
    by_name = {m.name: m for m in models}
    if name in by_name:
        return by_name[name]
    return by_name.get(default, models[0])


def compare_pair(session: ChatSession, info: ModelInfo | None) -> tuple[Side, Side] | None:
    """The two (model, adapter) sides Compare answers with.

    Args:
        session: the current chat (its model and adapter).
        info: the chat's model as the engine lists it, if known.

    Returns:
        ((base model, None), (finetuned model, adapter)): the chat's model without and with its LoRA adapter, or a
        full finetune's base and the finetune itself; None if the chat has no finetune to compare.
    """
    if session.adapter:
        return (session.model, None), (session.model, session.adapter)
    base = base_of(info) if info is not None else None
    if base:
        return (base, None), (session.model, None)
    return None


def side_label(model: str, adapter: str | None) -> str:
    """A Compare side's title.

    Args:
        model: the model's name.
        adapter: the LoRA adapter on it, if any.

    Returns:
        'model + adapter', or the model alone.
    """
    return f"{model} + {adapter}" if adapter else model


async def stream_answer(session: ChatSession, text: str, cfg: GenerationConfig, stop: threading.Event,
                        on_text: Callable[[str], Awaitable[Any]]) -> None:
    """Stream one answer from the engine into a callback, surviving Stop.

    If the awaiting task is cancelled (Chainlit's Stop cancels it, but not the engine's worker thread, chainlit
    #1539), the stop event is set and the engine is let finish its step, so the partial answer lands in the
    session's history.

    Args:
        session: the engine session that answers (its astream(text, cfg, should_stop=...)).
        text: the user's message.
        cfg: the generation settings.
        stop: set to stop generation; the engine reads it between decode steps.
        on_text: awaited with each non-empty piece of text as it arrives.

    Raises:
        EngineError: whatever the engine raises while answering.
    """

    async def pump() -> None:
        async for delta in session.astream(text, cfg, should_stop=stop.is_set):
            if delta.text:
                await on_text(delta.text)

    task = asyncio.create_task(pump())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await task


# ---------------------------------------------------------------------------------------------------------------
# the OpenAI-compatible API and the offline index page on Chainlit's FastAPI app


def mount_api(app: Any, api_router: Any) -> None:
    """Serve the engine's OpenAI-compatible routes (engine.api.build_router: paths under /v1) on Chainlit's server.

    Chainlit 2.12 registers a catch-all `GET /{full_path:path}` (the UI) when chainlit.server is imported, before
    the user's module loads, and routes match in order, so a plain include_router would leave GET /v1/models to
    the UI. /v1 belongs to the API alone, so its routes go first.

    Args:
        app: the FastAPI app (chainlit.server.app).
        api_router: the APIRouter with the API's routes.
    """
    routes = app.router.routes
    n = len(routes)
    app.include_router(api_router)
    routes[:] = routes[n:] + routes[:n]
    routes_changed(app.router)


def routes_changed(router: Any) -> None:
    """Tell a router its route list was edited by hand.

    FastAPI 0.165 caches the flattened routes of included routers per routes version; editing the list by hand must
    bump it (a no-op on versions without the cache).

    Args:
        router: a FastAPI/Starlette router whose `routes` list was reordered or extended.
    """
    mark = getattr(router, "_mark_routes_changed", None)
    if mark is not None:
        mark()


_EXTERNAL_LINK = re.compile(
    r'<link\b[^>]*?href="https://(?:fonts\.googleapis\.com|fonts\.gstatic\.com|cdn\.jsdelivr\.net)[^"]*"[^>]*>\s*')


def offline_index_html(html: str) -> str:
    """Chainlit's index page without its links to Google Fonts and the KaTeX CDN.

    Latex is off and the UI falls back to local fonts, so opening the app contacts nothing outside this machine.

    Args:
        html: the index page as Chainlit renders it (chainlit.server.get_html_template).

    Returns:
        The page with those <link> tags removed.
    """
    return _EXTERNAL_LINK.sub("", html)
