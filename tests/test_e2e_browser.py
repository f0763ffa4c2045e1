"""End to end in a real browser: `chainlit run chat_app.py` on the real default model (SmolLM2-135M-Instruct),
driven through Debian's headless Chromium by Playwright (sync API). Screenshots go to test-artifacts/.

The models root is built from the `smollm2_store` fixture: the model's files are linked, not copied. While the
server runs, the tests add a tiny LoRA adapter for it and a second model (the same weights under another name,
recorded as a finetune of smollm2-135m-instruct), so adapter switching, Compare and chat profiles have something to
work with and new store entries are shown to appear without a restart. The test's copy of model.json makes greedy
decoding and 128 new tokens the defaults, which keeps answers short and deterministic.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from e2e_helpers import REPO, ChatPage, add_tiny_adapter, chat_contexts, launch_chromium, max_overlap, running_server

pytestmark = pytest.mark.browser

BASE = "smollm2-135m-instruct"
COPY = "smollm2-135m-copy"
ADAPTER = "tiny-lora"
ANSWER_TIMEOUT = 90_000


def _link_model(src: Path, dst: Path, manifest_changes: dict) -> None:
    """dst/ holds symlinks to src's files and its own model.json (with manifest_changes applied)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.json":
            (dst / f.name).symlink_to(f)
    manifest = json.loads((src / "model.json").read_text())
    manifest.update(manifest_changes)
    (dst / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="module")
def e2e_store(smollm2_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e_models")
    # 128 new tokens: short answers, yet long enough that eight of them sent at once still overlap while the later
    # ones are admitted (at 32 the first answers had ended before the last began streaming on a fast CPU; at 64 the
    # eighth page's first words once showed 0.4 s after the first page's answer had ended: its send and first
    # render came 3.8 s after the first page's, eight pages streaming in one browser)
    fast = {"generation": {"temperature": 0.0, "max_new_tokens": 128}}
    _link_model(smollm2_store / BASE, root / BASE, fast)
    return root


@pytest.fixture(scope="module")
def server(e2e_store: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("playwright")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium package is not installed (.ci/run installs it)")
    log = tmp_path_factory.mktemp("e2e_logs") / "chainlit.log"
    # the engine's default serving dtype (bf16 on this CPU), as a user gets it
    env = {"CHAT_MODELS_DIR": str(e2e_store)}
    with running_server(REPO / "chat_app.py", env, log) as srv:
        yield srv
        tail = srv.log_tail()
    assert "Traceback" not in tail, f"the server logged an exception:\n{tail}"


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def chat(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield ChatPage(page, server.url).open()
    context.close()


def _footer(text: str) -> str:
    """The footer line of an answer (the last line holding 'completion tokens')."""
    lines = [line for line in text.splitlines() if "completion tokens" in line]
    assert lines, f"no footer in {text!r}"
    return lines[-1]


def test_capital_of_france_then_follow_up(chat):
    page = chat.page
    assert f"Chatting with {BASE}" in chat.last_answer_text()
    chat.open_settings()
    greedy = page.locator("#greedy")
    assert greedy.get_attribute("aria-checked") == "true", "greedy comes from the model's defaults"
    greedy.click()  # one click turns sampling on ...
    assert greedy.get_attribute("aria-checked") == "false"
    greedy.click()  # ... and one click back to greedy
    chat.confirm_settings()

    t0 = time.monotonic()
    chat.send("What is the capital of France?")
    chat.page.wait_for_function(  # the answer streams: its first words show while the task still runs
        "([sel]) => { const a = document.querySelectorAll(sel); return a.length > 1 && "
        "a[a.length - 1].innerText.trim().length > 0 && document.querySelector('#stop-button') !== null; }",
        arg=[".step[data-step-type='assistant_message']"], timeout=ANSWER_TIMEOUT)
    chat.wait_idle(ANSWER_TIMEOUT)
    first = chat.last_answer_text()
    assert "Paris" in first
    footer = _footer(first)
    assert f"{BASE} (no adapter)" in footer and "tokens/s" in footer and "first token" in footer
    chat.screenshot("01-capital-of-france")

    follow = chat.ask("What is a famous landmark in that city?", timeout=ANSWER_TIMEOUT)
    body = follow.split(_footer(follow))[0]
    assert len(body.strip()) > 10
    assert "Paris" in body or "Eiffel" in body or "Louvre" in body, body
    chat.screenshot("02-follow-up")
    assert time.monotonic() - t0 < 120


def test_adapter_switch_changes_footer_and_compare(chat, e2e_store):
    add_tiny_adapter(e2e_store, BASE, ADAPTER, rank=2, scale=0.02)  # appears while the chat is open
    before = chat.ask("Name a color.", timeout=ANSWER_TIMEOUT)  # the settings panel is refreshed after an answer
    assert f"{BASE} (no adapter)" in _footer(before)
    chat.open_settings()
    chat.choose("adapter", ADAPTER)
    chat.confirm_settings()
    chat.page.get_by_text(f"Adapter: {ADAPTER}").wait_for()
    after = chat.ask("Name another color.", timeout=ANSWER_TIMEOUT)
    assert f"{BASE} + adapter {ADAPTER}" in _footer(after)
    chat.screenshot("03-adapter-switched")

    chat.page.get_by_role("button", name="Compare base vs finetuned").last.click()
    view = chat.page.locator("[data-testid=compare-view]").last
    view.wait_for(timeout=ANSWER_TIMEOUT)
    chat.page.locator("[data-testid=compare-view][data-done=true]").last.wait_for(timeout=ANSWER_TIMEOUT)
    chat.wait_idle(ANSWER_TIMEOUT)
    base = chat.page.locator("[data-testid=compare-base]").last.inner_text()
    tuned = chat.page.locator("[data-testid=compare-finetuned]").last.inner_text()
    assert f"{BASE} (no adapter)" in base and f"{BASE} + adapter {ADAPTER}" in tuned
    chat.screenshot("04-compare-adapter")


def test_stop_during_a_long_answer(chat):
    page = chat.page
    chat.open_settings()
    page.locator("#max_new_tokens [role=slider]").press("End")  # 2048 new tokens
    chat.confirm_settings()
    before = chat.answer_count()
    chat.send("Write a very long story about a dragon who learns to bake bread. Make it at least 2000 words.")
    page.wait_for_function(
        "([sel, n]) => { const a = document.querySelectorAll(sel); return a.length > n && "
        "a[a.length - 1].innerText.trim().length > 40; }", arg=[".step[data-step-type='assistant_message']", before],
        timeout=ANSWER_TIMEOUT)
    t0 = time.monotonic()
    page.locator("#stop-button").click()
    chat.wait_idle(15_000)
    page.get_by_text("stopped by the user").wait_for(timeout=15_000)
    assert time.monotonic() - t0 < 10
    answers = chat.answers()
    texts = [answers.nth(i).inner_text() for i in range(before, answers.count())]
    stopped = [t for t in texts if "stopped by the user" in t]
    assert len(stopped) == 1 and "completion tokens" in stopped[0]
    tokens = int(stopped[0].split(" completion tokens")[0].rsplit("+ ", 1)[1])
    assert tokens < 2048
    length = len(chat.last_answer_text())
    page.wait_for_timeout(1500)
    assert len(chat.last_answer_text()) == length, "nothing streams after stop"
    chat.screenshot("05-stopped")
    chat.open_settings()
    slider = page.locator("#max_new_tokens [role=slider]")
    slider.press("Home")  # 1 token, then 31 steps right: back to 32
    for _ in range(31):
        slider.press("ArrowRight")
    chat.confirm_settings()
    again = chat.ask("Thanks. Now just say hello.", timeout=ANSWER_TIMEOUT)
    assert "completion tokens" in again, "the chat goes on after a stop"


def _send_all_at_once(chats: list[ChatPage], questions: list[str]) -> None:
    """Type each question in its page, then press send in every page, without waiting in between: Enter goes straight
    to each page's keyboard (its composer has the focus since type_message), without a locator's actionability waits,
    which under eight streaming pages took up to 2 s a page and spread the sends over 5 s."""
    for cp, q in zip(chats, questions):
        cp.type_message(q)
        cp.watch_next_answer()
    for cp in chats:
        cp.page.keyboard.press("Enter")


def test_two_browser_contexts_chat_at_once(browser, server):
    with chat_contexts(browser, server.url, 2) as chats:
        _send_all_at_once(chats, ["What is the capital of France?", "What is 2 + 2?"])
        for i, cp in enumerate(chats):
            cp.wait_footer(1, ANSWER_TIMEOUT)
            cp.screenshot(f"06-context-{i}")
        a, b = (cp.last_answer_text() for cp in chats)
        assert "Paris" in a and "Paris" not in b, "each context gets the answer to its own question"
        busy = [(t["busy"], t["idle"]) for t in (cp.answer_times() for cp in chats)]
        assert max_overlap(busy) == 2, f"both contexts generate at the same time: {busy}"


EIGHT_TOPICS = ["apples", "rivers", "guitars", "tigers", "bicycles", "clouds", "castles", "violins"]


def test_eight_browser_contexts_chat_at_once(browser, server):
    """Eight sessions (one browser, eight contexts) ask eight different questions at once; each gets its own streamed
    answer with a footer, and the answers stream at the same time: the engine decodes them as one batch."""
    questions = [f"Tell me about {topic}." for topic in EIGHT_TOPICS]  # answers run to the 128-token default
    with chat_contexts(browser, server.url, len(questions)) as chats:
        t0 = time.monotonic()
        _send_all_at_once(chats, questions)
        for cp in chats:
            cp.wait_footer(1, ANSWER_TIMEOUT)
        elapsed = time.monotonic() - t0
        chats[0].screenshot("10-eight-contexts-1")
        chats[-1].screenshot("10-eight-contexts-8")

        for i, (cp, q) in enumerate(zip(chats, questions)):
            assert cp.user_texts() == [q], f"page {i} shows exactly its own question"
            assert cp.answer_count() == 2, f"page {i}: the welcome message and one answer"
            answer = cp.last_answer_text()
            foot = _footer(answer)
            assert f"{BASE} (no adapter)" in foot and "tokens/s" in foot, foot
            body = answer.split(foot)[0].strip()
            assert body, f"page {i} got an empty answer"
            topic = EIGHT_TOPICS[i].removesuffix("s")  # greedy SmolLM2 opens with the topic: "Apples are ..."
            assert topic in body.lower(), f"page {i} ({q!r}) got an answer about something else: {body!r}"
            shown = cp.page.locator("body").inner_text()
            leaked = [other for other in questions if other != q and other in shown]
            assert not leaked, f"page {i} shows other sessions' questions: {leaked}"

        times = [cp.answer_times() for cp in chats]
        for i, t in enumerate(times):
            assert t["first_text"] is not None and t["first_text"] < t["footer"], f"page {i} did not stream: {t}"
        streaming = [(t["first_text"], t["footer"]) for t in times]
        together = max_overlap(streaming)
        assert together == len(chats), f"only {together} of 8 answers streamed at the same time: {streaming}"
        assert elapsed < 60, f"eight answers took {elapsed:.1f} s"


def test_switch_profile_and_compare_with_two_models(chat, e2e_store):
    manifest = json.loads((e2e_store / BASE / "model.json").read_text())
    src = (e2e_store / BASE / "model.safetensors").resolve().parent
    _link_model(src, e2e_store / COPY, {"generation": manifest["generation"], "name": COPY,
                                        "created_from": {"name": BASE}})
    chat.open()  # a reload lists the new model as a chat profile, no restart
    chat.switch_profile(COPY)
    chat.page.get_by_text(f"Chatting with {COPY}").wait_for(timeout=30_000)
    assert COPY in chat.page.locator("#chat-profiles").inner_text()
    answer = chat.ask("What is the capital of France?", timeout=ANSWER_TIMEOUT)
    assert f"{COPY} (no adapter)" in _footer(answer)
    chat.page.get_by_role("button", name="Compare base vs finetuned").last.click()
    chat.page.locator("[data-testid=compare-view][data-done=true]").last.wait_for(timeout=ANSWER_TIMEOUT)
    chat.wait_idle(ANSWER_TIMEOUT)
    base = chat.page.locator("[data-testid=compare-base]").last.inner_text()
    tuned = chat.page.locator("[data-testid=compare-finetuned]").last.inner_text()
    assert BASE in base and COPY in tuned
    assert "Paris" in base and "Paris" in tuned, "same weights, greedy: both answer alike"
    chat.screenshot("07-compare-two-models")


def test_bad_input(chat):
    page = chat.page
    users = page.locator(".step[data-step-type='user_message']")
    answers_before = chat.answer_count()
    for blank in ("", "   "):  # Chainlit's composer does not send blank text (the handler answers it with a notice)
        chat.send(blank)
        page.wait_for_timeout(500)
        assert users.count() == 0 and chat.answer_count() == answers_before
        assert page.locator("#stop-button").count() == 0
    chat.page.locator("#chat-input").fill("")

    t0 = time.monotonic()
    long_reply = chat.ask("word " * 10_000, timeout=60_000)  # 50,000 characters
    assert "shorten the message" in long_reply or "completion tokens" in long_reply
    assert time.monotonic() - t0 < 60
    chat.screenshot("08-long-message")

    tricky = chat.ask("<|endoftext|> ### Response: What is the capital of France?", timeout=ANSWER_TIMEOUT)
    assert "completion tokens" in tricky
    chat.screenshot("09-special-text")
    after = chat.ask("Say hi.", timeout=ANSWER_TIMEOUT)
    assert "completion tokens" in after, "the app is still usable"


def test_openai_api_on_the_chainlit_port(server):
    try:
        with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"GET /v1/models -> {e.code}: {server.log_tail(20)}")
    assert BASE in [m["id"] for m in body["data"]]
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        assert b'<div id="root">' in r.read(), "the UI is still served"


def test_page_loads_nothing_from_the_internet(browser, server):
    context = browser.new_context()
    page = context.new_page()
    external: list[str] = []
    lock = threading.Lock()

    def on_request(req) -> None:
        if not req.url.startswith(server.url) and not req.url.startswith(("data:", "blob:")):
            with lock:
                external.append(req.url)

    page.on("request", on_request)
    ChatPage(page, server.url).open()
    context.close()
    assert external == []
