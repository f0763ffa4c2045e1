"""ScratchChat's Chainlit front end: `chainlit run chat_app.py`.

Handlers only; every token comes from the engine's serving layer (engine.sessions: Engine, ChatSession). Chat
profiles are the models in the store (bases and full finetunes), the settings panel holds the LoRA adapter for the
current base and the sampling knobs, answers stream token by token with a footer (model, adapter, tokens, tokens/s,
time to first token), Stop signals the engine through a threading.Event (Chainlit cancels the asyncio task but not
the engine's worker thread, chainlit #1539), and Compare answers the last question with the base and with the
finetune side by side. The engine's OpenAI-compatible API is mounted on the same server under /v1.

The thin-handler shape follows LLMs-from-scratch ch05/11_qwen3/qwen3-chat-interface-multiturn.py (history in
cl.user_session, Message(content="") + stream_token + update). What needs no Chainlit (texts, settings ->
GenerationConfig, streaming with Stop, the route plumbing) is in chat_support.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import chainlit as cl
from chainlit.input_widget import NumberInput, Select, Slider, Switch, TextInput

# imported here, while Chainlit's load_module has this folder on sys.path (it takes it off afterwards)
from chat_support import (
    CATCH_ALL,
    build_generation_config,
    choose_model,
    compare_pair,
    describe_error,
    describe_model,
    footer,
    mount_api,
    no_model_text,
    offline_index_html,
    routes_changed,
    settings_values,
    side_label,
    stream_answer,
)
from engine.api import build_router
from engine.errors import EngineError
from engine.sessions import Engine

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
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
# the settings panel (chainlit's input widgets; the values it sends are read by chat_support.build_generation_config)


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


# ---------------------------------------------------------------------------------------------------------------
# sending helpers


async def notice(text: str) -> None:
    """A plain assistant message (hints, switches, bad input)."""
    await cl.Message(content=text).send()


async def error(text: str) -> None:
    """An error shown in the chat; the app stays usable."""
    await cl.ErrorMessage(content=text, author="Error").send()


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
    info = choose_model(models, cl.user_session.get("chat_profile"), DEFAULT_MODEL)
    if info is None:
        await notice(no_model_text())
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
        await notice(no_model_text())
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


@cl.on_message
async def on_message(message: cl.Message) -> None:
    """Stream the engine's answer to the user's message, then add the footer (and the Compare action)."""
    session = cl.user_session.get("chat")
    if session is None:
        await notice(no_model_text() if not get_engine().list_models()
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
        await stream_answer(session, text, cfg, stop, msg.stream_token)
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
    if compare_pair(session, cl.user_session.get("model_info")) is not None:
        msg.actions = [cl.Action(name="compare", payload={}, label="Compare base vs finetuned", icon="columns-2",
                                 tooltip="Answer your last message with the base and the finetuned model")]
    if msg.streaming:
        await msg.update()
    else:
        await msg.send()
    await _refresh_settings_panel()


# ---------------------------------------------------------------------------------------------------------------
# Compare: the base and the finetune answer the last user message side by side


@cl.action_callback("compare")
async def on_compare(action: cl.Action) -> None:
    """Answer the last user message (after the same earlier conversation) with the base and the finetuned model at
    once, in one side-by-side view."""
    session = cl.user_session.get("chat")
    text = cl.user_session.get("last_user_text")
    if session is None or not text:
        await notice("Send a message first; Compare answers your last message with both models.")
        return
    pair = compare_pair(session, cl.user_session.get("model_info"))
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
    sides = [{"title": side_label(*pair[0]), "role": "base", "text": "", "footer": ""},
             {"title": side_label(*pair[1]), "role": "finetuned", "text": "", "footer": ""}]
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

            await stream_answer(s, text, cfg, stop, add)
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
# the OpenAI-compatible API and the offline index page on the same server (the plumbing is in chat_support)


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
    routes_changed(router)
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
