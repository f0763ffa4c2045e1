"""ScratchChat's Chainlit front end: `chainlit run chat_app.py`.

Handlers only; every token comes from the engine's serving layer (engine.sessions: Engine, ChatSession). Chat
profiles are the models in the store (bases and full finetunes), the settings panel holds the LoRA adapter for the
current base and the sampling knobs, answers stream token by token with a footer (model, adapter, tokens, tokens/s,
time to first token), Stop signals the engine through a threading.Event (Chainlit cancels the asyncio task but not
the engine's worker thread, chainlit #1539), and Compare answers the last question with the base and with the
finetune side by side. The engine's OpenAI-compatible API is mounted on the same server under /v1.

The thin-handler shape follows LLMs-from-scratch ch05/11_qwen3/qwen3-chat-interface-multiturn.py (history in
cl.user_session, Message(content="") + stream_token + update).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import threading
from typing import Any

import chainlit as cl
from chainlit.input_widget import NumberInput, Select, Slider, Switch, TextInput

# imported here, while Chainlit's load_module has this folder on sys.path (it takes it off afterwards)
from engine.api import build_router
from engine.errors import EngineError
from engine.sessions import Engine

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
FETCH_COMMAND = "python -m weights fetch smollm2-135m-instruct"
NO_ADAPTER = "none"
STREAM_UPDATE_S = 0.15  # how often the Compare view re-renders while both answers stream

_engine = None


def get_engine():
    """The process-wide engine (registry + scheduler), created on first use."""
    global _engine
    if _engine is None:
        _engine = Engine.default()
    return _engine


# ---------------------------------------------------------------------------------------------------------------
# small pure helpers (tested directly)


def format_params(n: int | None) -> str:
    """124439808 -> '124M', 1_500_000_000 -> '1.5B'."""
    if not n:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{round(n / 1e6)}M"


def describe_model(info: Any) -> str:
    """One markdown paragraph about a model (ModelInfo) for its chat profile and the welcome message."""
    parts = [f"**{info.name}**: {info.family}, {format_params(info.num_parameters)} parameters, "
             f"prompt format `{info.prompt_format}`, stored as {info.dtype}."]
    created_from = getattr(info, "created_from", None)
    if created_from:
        parts.append(f"Finetuned from `{created_from.get('name', '?')}`.")
    adapters = list(getattr(info, "adapters", []) or [])
    if adapters:
        parts.append("Adapters: " + ", ".join(f"`{a}`" for a in adapters) + ".")
    return " ".join(parts)


def base_of(info: Any) -> str | None:
    """The model a full finetune was made from (its manifest's created_from.name), or None for a base model."""
    created_from = getattr(info, "created_from", None)
    return created_from.get("name") if isinstance(created_from, dict) else None


def footer(usage: Any, *, stopped: bool = False) -> str:
    """The line under each answer: model (+ adapter), prompt/completion tokens, tokens/s, time to first token."""
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


def parse_seed(value: Any) -> int | None:
    """The seed widget's value -> int, or None (random) for empty/negative/garbage."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seed = int(float(value))
    except (TypeError, ValueError):
        return None
    return seed if seed >= 0 else None


def build_generation_config(defaults: Any, settings: dict[str, Any]) -> Any:
    """The model's GenerationConfig with the settings panel applied; ValueError (from the config) if invalid."""
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


def settings_widgets(defaults: Any, adapters: list[str], adapter: str | None, system_prompt: str) -> list:
    """The settings panel: adapter for the current base, system prompt, sampling knobs (defaults from the model)."""
    greedy = defaults.temperature == 0
    return [
        Select(id="adapter", label="LoRA adapter", values=[NO_ADAPTER, *adapters],
               initial_value=adapter or NO_ADAPTER,
               description="Adapters in the store for this model. Switching keeps the conversation."),
        TextInput(id="system_prompt", label="System prompt", initial=system_prompt, multiline=True,
                  placeholder="empty: the model's default"),
        Switch(id="greedy", label="Greedy (always the most likely token)", initial=greedy),
        Slider(id="temperature", label="Temperature", initial=float(defaults.temperature), min=0, max=2, step=0.05),
        Slider(id="top_k", label="Top-k (0 = off)", initial=int(defaults.top_k or 0), min=0, max=200, step=1),
        Slider(id="top_p", label="Top-p (1 = off)", initial=float(defaults.top_p if defaults.top_p is not None
                                                                  else 1.0), min=0.05, max=1, step=0.01),
        Slider(id="max_new_tokens", label="Max new tokens", initial=int(defaults.max_new_tokens), min=1, max=2048,
               step=1),
        Slider(id="repetition_penalty", label="Repetition penalty (1 = off)",
               initial=float(defaults.repetition_penalty or 1.0), min=1.0, max=2.0, step=0.05),
        NumberInput(id="seed", label="Seed (empty = random)",
                    initial=defaults.seed if defaults.seed is not None else None, placeholder="random"),
    ]


def settings_values(widgets: list) -> dict[str, Any]:
    """The values a freshly sent settings panel holds (what Chainlit's ChatSettings.send() returns)."""
    return {w.id: w.initial for w in widgets}


# ---------------------------------------------------------------------------------------------------------------
# sending helpers


async def notice(text: str) -> None:
    """A plain assistant message (hints, switches, bad input)."""
    await cl.Message(content=text).send()


async def error(text: str) -> None:
    """An error shown in the chat; the app stays usable."""
    await cl.ErrorMessage(content=text, author="Error").send()


_ERROR_TITLES = {  # EngineError subclass name -> what the user reads first
    "ContextTooLong": "Message too long for the model's context",
    "EngineBusy": "The engine is busy",
    "ModelLoadError": "The model failed to load",
    "AdapterMismatch": "This adapter does not fit the model",
    "UnknownModel": "Not in the model store",
}


def describe_error(e: EngineError) -> str:
    """'**Title:** the engine's own message' for an engine error."""
    title = _ERROR_TITLES.get(type(e).__name__, "The engine could not answer")
    return f"**{title}:** {e}"


def _no_model_text() -> str:
    root = _models_dir_hint()
    return (f"No model in the store{root}. Fetch the default model, then reload this page:\n\n"
            f"```\n{FETCH_COMMAND}\n```")


def _models_dir_hint() -> str:
    return f" (`{os.environ['CHAT_MODELS_DIR']}`)" if os.environ.get("CHAT_MODELS_DIR") else " (`./models`)"


def _chosen_model(models: list[Any]) -> Any | None:
    """The ModelInfo of the chat profile the user picked (or the default one)."""
    if not models:
        return None
    name = cl.user_session.get("chat_profile")
    by_name = {m.name: m for m in models}
    if name in by_name:
        return by_name[name]
    return by_name.get(DEFAULT_MODEL, models[0])


async def _refresh_settings_panel(*, force: bool = False) -> None:
    """Re-send the settings panel if the adapters for the current base changed (e.g. a finetune just finished)."""
    session = cl.user_session.get("chat")
    if session is None:
        return
    adapters = get_engine().list_adapters(session.model)
    if not force and adapters == cl.user_session.get("adapters"):
        return
    cl.user_session.set("adapters", adapters)
    settings = dict(cl.user_session.get("settings") or {})
    widgets = settings_widgets(cl.user_session.get("defaults"), adapters, session.adapter,
                               settings.get("system_prompt", ""))
    for w in widgets:  # keep what the user set; only the adapter list changes
        if w.id in settings and w.id != "adapter":
            w.initial = settings[w.id]
    await cl.ChatSettings(widgets).send()


# ---------------------------------------------------------------------------------------------------------------
# Chainlit handlers


@cl.set_chat_profiles
async def chat_profiles(current_user: Any = None, language: str | None = None) -> list[cl.ChatProfile]:
    """One profile per model in the store (re-read on every page load, so new finetunes show up)."""
    try:
        models = get_engine().list_models()
    except Exception:  # a broken store must not break the page; on_chat_start reports it
        logger.exception("listing models failed")
        return []
    names = [m.name for m in models]
    default = DEFAULT_MODEL if DEFAULT_MODEL in names else (names[0] if names else None)
    return [
        cl.ChatProfile(name=m.name, markdown_description=describe_model(m), default=m.name == default)
        for m in models
    ]


@cl.on_chat_start
async def on_chat_start() -> None:
    """Open an engine session on the chosen model and send the settings panel and a welcome line."""
    cl.user_session.set("chat", None)
    cl.user_session.set("stop_event", threading.Event())
    engine = get_engine()
    try:
        models = engine.list_models()
    except Exception as e:
        logger.exception("listing models failed")
        await error(f"Could not read the model store: {e}")
        return
    info = _chosen_model(models)
    if info is None:
        await notice(_no_model_text())
        return
    try:
        defaults = engine.generation_defaults(info.name)
        session = await asyncio.to_thread(engine.new_session, info.name)  # loads the model: off the event loop
    except EngineError as e:
        await error(f"{describe_error(e)}\n\nCould not start a chat with `{info.name}`; pick another model in the "
                    "profile menu.")
        return
    adapters = engine.list_adapters(info.name)
    cl.user_session.set("chat", session)
    cl.user_session.set("model_info", info)
    cl.user_session.set("defaults", defaults)
    cl.user_session.set("adapters", adapters)
    widgets = settings_widgets(defaults, adapters, None, "")
    cl.user_session.set("settings", settings_values(widgets))
    await cl.ChatSettings(widgets).send()
    others = [m.name for m in models if m.name != info.name]
    lines = [f"Chatting with {describe_model(info)}",
             "Sampling, system prompt and LoRA adapter are in the settings (⚙ next to the message box)."]
    if others:
        lines.append("Other models (profile menu at the top): " + ", ".join(f"`{n}`" for n in others) + ".")
    await notice("\n\n".join(lines))


@cl.on_settings_update
async def on_settings_update(settings: dict[str, Any]) -> None:
    """Apply the settings panel: hot-swap the adapter (history kept), set the system prompt, keep sampling knobs."""
    session = cl.user_session.get("chat")
    if session is None:
        await notice(_no_model_text())
        return
    old = dict(cl.user_session.get("settings") or {})
    new = {**old, **settings}
    try:
        build_generation_config(cl.user_session.get("defaults"), new)
    except (TypeError, ValueError) as e:
        await error(f"Those sampling settings are invalid: {e}. The previous ones stay in use.")
        return
    adapter = settings.get("adapter", old.get("adapter", NO_ADAPTER)) or NO_ADAPTER
    wanted = None if adapter == NO_ADAPTER else adapter
    if wanted != session.adapter:
        try:
            await asyncio.to_thread(session.set_adapter, wanted)  # loads the adapter
        except EngineError as e:
            new["adapter"] = old.get("adapter", NO_ADAPTER)
            cl.user_session.set("settings", new)
            await error(f"{describe_error(e)}\n\nStill using: {session.adapter or 'no adapter'}.")
            await _refresh_settings_panel(force=True)
            return
        await notice(f"Adapter: **{adapter}** on `{session.model}`. The conversation so far is kept; "
                     "the next answer uses it.")
    system_prompt = (new.get("system_prompt") or "").strip()
    if system_prompt != (old.get("system_prompt") or "").strip():
        session.set_system_prompt(system_prompt or None)
        await notice("System prompt updated." if system_prompt else "System prompt reset to the model's default.")
    cl.user_session.set("settings", new)


@cl.on_stop
async def on_stop() -> None:
    """Signal the engine: its worker thread reads the event through should_stop between decode steps."""
    event = cl.user_session.get("stop_event")
    if event is not None:
        event.set()


@cl.on_chat_end
async def on_chat_end() -> None:
    """The tab closed or a new chat began: stop whatever this chat still generates, freeing its engine slot."""
    await on_stop()


async def _stream_answer(session: Any, text: str, cfg: Any, stop: threading.Event, on_text) -> None:
    """Stream session.astream(text) into on_text(delta_text); if this task is cancelled (Stop), set the event and
    let the engine finish its step so the partial answer lands in the session's history."""

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


@cl.on_message
async def on_message(message: cl.Message) -> None:
    """Stream the engine's answer to the user's message, then add the footer (and the Compare action)."""
    session = cl.user_session.get("chat")
    if session is None:
        await notice(_no_model_text() if not get_engine().list_models()
                     else "This chat has no model (it failed to load). Pick another model in the profile menu.")
        return
    text = message.content or ""
    if not text.strip():
        await notice("Your message is empty. Type a question and press Enter.")
        return
    try:
        cfg = build_generation_config(cl.user_session.get("defaults"), cl.user_session.get("settings") or {})
    except (TypeError, ValueError) as e:
        await error(f"Invalid sampling settings: {e}")
        return
    stop = threading.Event()
    cl.user_session.set("stop_event", stop)
    cl.user_session.set("last_user_text", text)
    msg = cl.Message(content="")
    failure: str | None = None
    try:
        await _stream_answer(session, text, cfg, stop, msg.stream_token)
    except EngineError as e:
        failure = describe_error(e)
    except Exception as e:  # the chat must survive anything the engine throws
        logger.exception("generation failed")
        failure = f"{type(e).__name__}: {e}"
    answer = msg.content
    if failure is not None and not answer:
        await error(failure)
        return
    usage = getattr(session, "last_usage", None)
    parts = [answer if answer else "*(empty answer)*"]
    if failure is not None:
        parts.append(f"**Generation failed:** {failure}")
    if usage is not None:
        parts.append(footer(usage, stopped=stop.is_set()))
    msg.content = "\n\n".join(parts)
    if _compare_pair(session) is not None:
        msg.actions = [cl.Action(name="compare", payload={}, label="Compare base vs finetuned", icon="columns-2",
                                 tooltip="Answer your last message with the base and the finetuned model")]
    if msg.streaming:
        await msg.update()
    else:
        await msg.send()
    await _refresh_settings_panel()


# ---------------------------------------------------------------------------------------------------------------
# Compare: the base and the finetune answer the last user message side by side


def _compare_pair(session: Any) -> tuple[tuple[str, str | None], tuple[str, str | None]] | None:
    """((base model, None), (finetuned model, adapter)) for the current chat, or None if there is no finetune."""
    if session.adapter:
        return (session.model, None), (session.model, session.adapter)
    info = cl.user_session.get("model_info")
    base = base_of(info) if info is not None else None
    if base:
        return (base, None), (session.model, None)
    return None


def _label(model: str, adapter: str | None) -> str:
    return f"{model} + {adapter}" if adapter else model


@cl.action_callback("compare")
async def on_compare(action: cl.Action) -> None:
    """Answer the last user message (after the same earlier conversation) with the base and the finetuned model at
    once, in one side-by-side view."""
    session = cl.user_session.get("chat")
    text = cl.user_session.get("last_user_text")
    if session is None or not text:
        await notice("Send a message first; Compare answers your last message with both models.")
        return
    pair = _compare_pair(session)
    if pair is None:
        await notice("Nothing to compare yet: pick a LoRA adapter in the settings, or a finetuned model in the "
                     "profile menu.")
        return
    engine = get_engine()
    settings = cl.user_session.get("settings") or {}
    system_prompt = (settings.get("system_prompt") or "").strip() or None
    cfg = build_generation_config(cl.user_session.get("defaults"), settings)
    prior = list(session.history)
    if len(prior) >= 2 and prior[-2] == {"role": "user", "content": text}:
        prior = prior[:-2]  # the last exchange is the one being compared
    stop = threading.Event()
    cl.user_session.set("stop_event", stop)
    sides = [{"title": _label(*pair[0]), "role": "base", "text": "", "footer": ""},
             {"title": _label(*pair[1]), "role": "finetuned", "text": "", "footer": ""}]
    view = cl.CustomElement(name="Compare", props={"question": text, "sides": sides, "done": False},
                            display="inline")
    msg = cl.Message(content=f"**Compare** on your last message: base `{sides[0]['title']}` vs finetuned "
                             f"`{sides[1]['title']}`", elements=[view])
    await cl.context.emitter.task_start()  # the stop button shows and stops both answers
    await msg.send()
    dirty = asyncio.Event()

    async def run(i: int, model: str, adapter: str | None) -> None:
        try:
            s = await asyncio.to_thread(engine.new_session, model, adapter=adapter, system_prompt=system_prompt)
            s.history.extend(prior)  # same conversation so far, so follow-up questions compare fairly

            async def add(delta: str) -> None:
                sides[i]["text"] += delta
                dirty.set()

            await _stream_answer(s, text, cfg, stop, add)
            if s.last_usage is not None:
                sides[i]["footer"] = footer(s.last_usage, stopped=stop.is_set()).strip("*")
        except EngineError as e:
            sides[i]["footer"] = f"error: {describe_error(e).replace('**', '')}"
        except Exception as e:
            logger.exception("compare failed")
            sides[i]["footer"] = f"error: {type(e).__name__}: {e}"
        dirty.set()

    async def render_while(tasks: list[asyncio.Task]) -> None:
        while not all(t.done() for t in tasks):
            try:
                await asyncio.wait_for(dirty.wait(), timeout=STREAM_UPDATE_S)
            except asyncio.TimeoutError:
                continue
            dirty.clear()
            view.props = {"question": text, "sides": sides, "done": False}
            await view.update()
            await asyncio.sleep(STREAM_UPDATE_S)

    try:
        tasks = [asyncio.create_task(run(i, m, a)) for i, (m, a) in enumerate(pair)]
        await render_while(tasks)
        await asyncio.gather(*tasks)
    finally:
        view.props = {"question": text, "sides": sides, "done": True}
        await view.update()
        await cl.context.emitter.task_end()


# ---------------------------------------------------------------------------------------------------------------
# the OpenAI-compatible API on the same server


CATCH_ALL = "/{full_path:path}"


def mount_api(app: Any, api_router: Any) -> None:
    """Serve the engine's OpenAI-compatible routes (engine.api.build_router: paths under /v1) on Chainlit's server.

    Chainlit 2.12 registers a catch-all `GET /{full_path:path}` (the UI) when chainlit.server is imported, before
    the user's module loads, and routes match in order, so a plain include_router would leave GET /v1/models to
    the UI. /v1 belongs to the API alone, so its routes go first.
    """
    routes = app.router.routes
    n = len(routes)
    app.include_router(api_router)
    routes[:] = routes[n:] + routes[:n]
    _routes_changed(app.router)


def _routes_changed(router: Any) -> None:
    # FastAPI 0.165 caches the flattened routes of included routers per routes version; editing the list by hand
    # must bump it (a no-op on versions without the cache)
    mark = getattr(router, "_mark_routes_changed", None)
    if mark is not None:
        mark()


_EXTERNAL_LINK = re.compile(
    r'<link\b[^>]*?href="https://(?:fonts\.googleapis\.com|fonts\.gstatic\.com|cdn\.jsdelivr\.net)[^"]*"[^>]*>\s*')


def offline_index_html(html: str) -> str:
    """Chainlit's index page without its links to Google Fonts and the KaTeX CDN (latex is off; the UI falls back to
    local fonts), so opening the app contacts nothing outside this machine."""
    return _EXTERNAL_LINK.sub("", html)


def serve_offline_index(router: Any) -> bool:
    """Serve the UI's index page through offline_index_html: a route just in front of the catch-all in Chainlit's
    router (chainlit.server.router). Returns False (and leaves the router alone) if there is no catch-all."""
    from chainlit.server import get_html_template
    from starlette.responses import HTMLResponse

    routes = router.routes
    at = next((i for i, r in enumerate(routes) if str(getattr(r, "path", "")).endswith(CATCH_ALL)), None)
    if at is None:
        logger.warning("no catch-all route in Chainlit's router; the index page keeps its external links")
        return False

    async def index() -> HTMLResponse:
        # the root path Chainlit's own `serve` route uses (set by --root-path / a parent app)
        root_path = os.getenv("CHAINLIT_PARENT_ROOT_PATH", "") + os.getenv("CHAINLIT_ROOT_PATH", "")
        return HTMLResponse(offline_index_html(get_html_template(root_path)))

    router.add_api_route(CATCH_ALL, index, methods=["GET"], response_class=HTMLResponse, include_in_schema=False,
                         name="offline_index")
    routes.insert(at, routes.pop())
    _routes_changed(router)
    return True


@cl.on_app_startup
async def on_app_startup() -> None:
    """Mount engine.api's routes under /v1 on Chainlit's FastAPI app, and serve the index page offline."""
    from chainlit.server import app, router

    serve_offline_index(router)
    try:
        mount_api(app, build_router(get_engine()))
    except Exception:  # the chat UI still works without the API
        logger.exception("could not mount the OpenAI-compatible API under /v1")
