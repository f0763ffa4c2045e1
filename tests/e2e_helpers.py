"""Helpers for the browser tests: start/stop `chainlit run` on a free port, launch Debian's headless Chromium
through Playwright, and drive Chainlit 2.12's chat UI (composer, send and stop buttons, messages, settings).

Selectors come from Chainlit 2.12's built frontend: `#chat-input` (composer), `#chat-submit` (send),
`#stop-button` (shown while a task runs), `.step[data-step-type=assistant_message]` (an answer),
`#chat-settings-open-modal` (settings), `#chat-profiles` (profile picker), `#new-chat-button`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER = ".step[data-step-type='assistant_message']"
USER = ".step[data-step-type='user_message']"
FOOTER_MARK = "completion tokens"  # every answer's footer says "... N prompt + M completion tokens ..."

# Installed in a page before a message is sent: a MutationObserver (not a timer, which background pages throttle)
# records with the page's wall clock when the next answer first shows text (still without its footer), when its
# footer shows, and when the stop button appears and goes. All pages of a browser share that clock.
_WATCH_NEXT_ANSWER_JS = """([answerSel, footerMark]) => {
  const before = document.querySelectorAll(answerSel).length;
  const times = {first_text: null, footer: null, busy: null, idle: null};
  window.__answerTimes = times;
  const check = () => {
    const now = Date.now();
    const busy = document.querySelector('#stop-button') !== null;
    if (busy && times.busy === null) times.busy = now;
    if (!busy && times.busy !== null && times.idle === null) times.idle = now;
    const answers = document.querySelectorAll(answerSel);
    if (answers.length > before) {
      const text = answers[answers.length - 1].innerText;
      if (text.includes(footerMark)) { if (times.footer === null) times.footer = now; }
      else if (times.first_text === null && text.trim().length > 0) times.first_text = now;
    }
    if (times.footer !== null && times.idle !== null) observer.disconnect();
  };
  const observer = new MutationObserver(check);
  observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def free_port() -> int:
    """Ask the OS for a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChainlitServer:
    """A `chainlit run <app> --headless` subprocess on a free port, logging to a file.

    Args:
        app: path of the Chainlit app file.
        env: extra environment variables (e.g. CHAT_MODELS_DIR).
        log_path: where stdout/stderr of the server go.
        cwd: working directory (the folder holding `.chainlit/` and `chainlit.md`).
    """

    def __init__(self, app: Path, env: dict[str, str], log_path: Path, cwd: Path = REPO) -> None:
        self.app, self.env, self.log_path, self.cwd = app, env, log_path, cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until GET /health answers; raise with the log tail if it dies or times out."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        # the `chainlit` script, as users run it (not `python -m chainlit`, which would put cwd on sys.path)
        cmd = [str(Path(sys.executable).parent / "chainlit"), "run", str(self.app), "--headless",
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # own process group so stop() ends the server and nothing else
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chainlit exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"chainlit did not answer /health within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        """The last n lines the server wrote."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, 15)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, 9)
            self.proc.wait(timeout=10)
        self._log.close()


@contextmanager
def running_server(app: Path, env: dict[str, str], log_path: Path, cwd: Path = REPO) -> Iterator[ChainlitServer]:
    """Context manager around ChainlitServer.start/stop."""
    server = ChainlitServer(app, env, log_path, cwd)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def launch_chromium(playwright):
    """Headless Debian Chromium; never a downloaded browser build."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


class ChatPage:
    """A Playwright page on the Chainlit app, with the few actions the tests need."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url

    def open(self, timeout: float = 60_000) -> ChatPage:
        """Load the app and wait until the socket is connected (network idle, the composer) and the app's welcome
        message (sent once the model is loaded) is shown."""
        self.page.goto(self.url, wait_until="networkidle", timeout=timeout)
        self.page.wait_for_selector("#chat-input", state="visible", timeout=timeout)
        self.page.wait_for_selector(ANSWER, timeout=timeout)
        return self

    def answers(self):
        """Locator of all assistant messages, oldest first."""
        return self.page.locator(ANSWER)

    def answer_count(self) -> int:
        return self.answers().count()

    def last_answer_text(self) -> str:
        loc = self.answers()
        n = loc.count()
        return loc.nth(n - 1).inner_text() if n else ""

    def type_message(self, text: str) -> None:
        """Put text into the composer (fill, not keystrokes: fast even for 50,000 characters)."""
        box = self.page.locator("#chat-input")
        box.click()
        box.fill(text)

    def press_send(self) -> None:
        """Press Enter in the composer (sends what type_message put there)."""
        self.page.locator("#chat-input").press("Enter")

    def send(self, text: str) -> None:
        """Type text and press Enter."""
        self.type_message(text)
        self.press_send()

    def wait_idle(self, timeout: float = 120_000) -> None:
        """Wait until no task runs (the stop button is gone)."""
        self.page.wait_for_selector("#stop-button", state="detached", timeout=timeout)

    def wait_busy(self, timeout: float = 30_000) -> None:
        """Wait until a task runs (the stop button shows)."""
        self.page.wait_for_selector("#stop-button", state="visible", timeout=timeout)

    def ask(self, text: str, timeout: float = 120_000) -> str:
        """Send text, wait for a new answer to appear and the task to end; return the new answers' text."""
        before = self.answer_count()
        self.send(text)
        self.page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length > n", arg=[ANSWER, before], timeout=timeout
        )
        self.wait_idle(timeout)
        loc = self.answers()
        return "\n".join(loc.nth(i).inner_text() for i in range(before, loc.count()))

    def wait_footer(self, before: int, timeout: float = 120_000) -> str:
        """Wait until there are more than `before` answers, the last one carries its footer and the task ended;
        return the last answer's text."""
        self.page.wait_for_function(
            "([sel, n, mark]) => { const a = document.querySelectorAll(sel); return a.length > n && "
            "a[a.length - 1].innerText.includes(mark); }", arg=[ANSWER, before, FOOTER_MARK], timeout=timeout)
        self.wait_idle(timeout)
        return self.last_answer_text()

    def user_texts(self) -> list[str]:
        """The text of every user message shown, oldest first."""
        loc = self.page.locator(USER)
        return [loc.nth(i).inner_text().strip() for i in range(loc.count())]

    def watch_next_answer(self) -> None:
        """Start recording the timing of the next answer (call before sending; read with answer_times())."""
        self.page.evaluate(_WATCH_NEXT_ANSWER_JS, [ANSWER, FOOTER_MARK])

    def answer_times(self) -> dict[str, float | None]:
        """Epoch milliseconds (the page's clock) recorded since watch_next_answer(): `first_text` (the answer shows
        text, no footer yet: it is streaming), `footer`, `busy` (stop button shown), `idle` (stop button gone)."""
        return self.page.evaluate("() => window.__answerTimes")

    def screenshot(self, name: str) -> Path:
        """Save a full-page screenshot into test-artifacts/ and return its path."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    # --- settings panel (cl.ChatSettings; widgets carry their ids) ---------------------------------------------

    def open_settings(self) -> None:
        self.page.locator("#chat-settings-open-modal").click()
        self.page.wait_for_selector("#confirm", state="visible", timeout=10_000)

    def choose(self, widget_id: str, value: str) -> None:
        """Pick value in a Select widget of the open settings panel."""
        self.page.locator(f"#{widget_id}").click()
        self.page.get_by_role("option", name=value, exact=True).click()

    def confirm_settings(self) -> None:
        self.page.locator("#confirm").click()
        self.page.wait_for_selector("#confirm", state="detached", timeout=10_000)

    # --- chat profiles ----------------------------------------------------------------------------------------

    def switch_profile(self, name: str) -> None:
        """Pick another chat profile (a new chat starts; confirm the dialog if Chainlit asks)."""
        self.page.locator("#chat-profiles").click()
        self.page.get_by_role("option", name=name).first.click()
        confirm = self.page.locator("#confirm")
        try:
            confirm.wait_for(state="visible", timeout=3_000)
            confirm.click()
        except Exception:  # no dialog when the chat is empty
            pass


@contextmanager
def chat_contexts(browser, url: str, n: int, viewport: dict | None = None) -> Iterator[list[ChatPage]]:
    """n fresh browser contexts (each its own Chainlit session) with the app open; closed on exit."""
    contexts = []
    try:
        chats = []
        for _ in range(n):
            contexts.append(browser.new_context(viewport=viewport or {"width": 1000, "height": 800}))
            chats.append(ChatPage(contexts[-1].new_page(), url).open())
        yield chats
    finally:
        for ctx in contexts:
            ctx.close()


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The largest number of [start, end) intervals that share one instant (one that ends as another starts: no)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


# --- model store fixtures shared by the handler and browser tests ----------------------------------------------

TINY_LLAMA = {"vocab_size": 257, "context_length": 1024, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
              "ffn_dim": 64, "norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False}


def add_tiny_model(root: Path, name: str, *, seed: int = 0, created_from: dict | None = None,
                   generation: dict | None = None) -> dict:
    """A random 2-layer Llama-style model with the byte tokenizer (vocab 257) and the alpaca format, in the store."""
    import torch

    from engine.config import ModelConfig
    from engine.model import GPT
    from weights.store import add_model

    config = ModelConfig.from_dict(TINY_LLAMA)
    torch.manual_seed(seed)
    state = GPT(config).state_dict()
    return add_model(name, config.to_dict(), state, tokenizer={"type": "none", "vocab_size": 257},
                     prompt_format="alpaca", dtype="float32", source={"test": "random"}, created_from=created_from,
                     generation=generation or {"max_new_tokens": 24, "temperature": 0.0}, root=root)


def copy_model(root: Path, src: str, dst: str, *, created_from: dict | None = None) -> None:
    """A second model in the store: the files of src under a new name (a stand-in for a full finetune)."""
    import json
    import shutil

    target = root / dst
    shutil.copytree(root / src, target, ignore=shutil.ignore_patterns("adapters"))
    manifest = json.loads((target / "model.json").read_text())
    manifest["name"] = dst
    manifest["created_from"] = created_from
    (target / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")


def add_tiny_adapter(root: Path, base: str, name: str, *, seed: int = 1, rank: int = 2, scale: float = 0.05,
                     targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A small random PEFT LoRA adapter for `base`, saved into the store as finetune's `lora` saves one.

    peft wraps engine.model.GPT built from the base's config (weights don't matter for the adapter's shapes);
    B is random and scaled down so the adapter nudges the base instead of drowning it.
    """
    import json

    import peft
    import torch

    from engine.config import ModelConfig
    from engine.model import GPT

    manifest = json.loads((root / base / "model.json").read_text())
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = GPT(ModelConfig.from_dict(manifest["config"]))
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname:
                p.mul_(scale)
    folder = root / base / "adapters" / name
    folder.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(folder))
    (folder / "scratchchat.json").write_text(json.dumps(
        {"base": base, "base_sha256": manifest.get("sha256"), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
         "source": "tests (tiny random adapter)"}, indent=2) + "\n")
    return folder
