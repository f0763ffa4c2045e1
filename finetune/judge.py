"""Scoring responses with a judge model over HTTP, the book's ch. 7.8: each response is scored 0-100 with the seed's
exact prompt, and the average over the replies that hold a usable integer is reported next to how many did not.
The judge is Ollama's ``/api/chat`` (the seed's payload: ``options = {"seed": 123, "temperature": 0, "num_ctx":
2048}``, streamed JSON lines) or any OpenAI-compatible ``/v1/chat/completions`` (``seed`` 123, ``temperature`` 0),
for example this project's own ``python -m engine serve``. Two parse rules turn a reply into a score: ``int`` (the
seed's ``int(reply)``, the default) and the opt-in ``first-int`` (the first integer 0..100 in the reply, for weak
local judges that wrap the number in words such as "Score: 85/100").
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_JUDGE_URL = "http://localhost:11434/api/chat"
JUDGE_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
PARSE_RULES = {
    "int": "int: the whole reply must be an integer (the seed's int(reply))",
    "first-int": "first-int: the first integer 0..100 in the reply",
}
# A whole number standing alone: not inside a word ("1st", "v2") and not part of a decimal ("4.5"); a trailing
# full stop ("85.") or a slash ("85/100") may follow.
_NUMBER_RE = re.compile(r"(?<![\w.])(-?\d+)(\.\d+)?(?!\w)")


def format_input(entry: dict[str, str]) -> str:
    """The book's Alpaca ``format_input``, which the seed's judge prompt embeds whatever format was trained."""
    from engine.prompts import get_prompt_format

    return get_prompt_format("alpaca").format(entry["instruction"], entry.get("input", ""))


def judge_prompt(entry: dict[str, str], key: str = "model_response") -> str:
    """The seed's exact scoring prompt."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def parse_score(reply: str, rule: str = "int") -> int | None:
    """The score in a judge's reply, or None when the reply holds no usable integer.

    Args:
        reply: the judge's reply text.
        rule: ``int``: ``int(reply.strip())``, exactly the seed's conversion (any integer, nothing else in the
            reply); ``first-int``: the first whole number in the reply whose value is 0..100 ("Score: 85/100" ->
            85, "I give it 4.5, so 60." -> 60); numbers inside words or with a decimal part are not integers.

    Raises:
        ValueError: an unknown rule.
    """
    if rule == "int":
        try:
            return int(reply.strip())
        except ValueError:
            return None
    if rule == "first-int":
        for m in _NUMBER_RE.finditer(reply):
            if m.group(2) is None and 0 <= int(m.group(1)) <= 100:
                return int(m.group(1))
        return None
    raise ValueError(f"judge parse rule must be one of {sorted(PARSE_RULES)}, got {rule!r}")


def detect_api(url: str) -> str:
    """``ollama`` for an ``/api/chat`` URL, else ``openai``."""
    return "ollama" if urllib.parse.urlparse(url).path.rstrip("/").endswith("/api/chat") else "openai"


def openai_chat_url(url: str) -> str:
    """Accept a server root, a ``/v1`` base or the full ``/v1/chat/completions`` URL."""
    path = urllib.parse.urlparse(url).path.rstrip("/")
    if path.endswith("/chat/completions"):
        return url
    if path.endswith("/v1"):
        return url.rstrip("/") + "/chat/completions"
    return url.rstrip("/") + "/v1/chat/completions"


def query_model(prompt: str, *, url: str = DEFAULT_JUDGE_URL, model: str = "llama3", api: str = "auto",
                timeout: float = 300.0, api_key: str | None = None, max_tokens: int | None = None) -> str:
    """Send one user message to the judge and return its reply text.

    Args:
        api: ``ollama`` (POST the seed's payload to ``/api/chat``, read the streamed JSON lines and join each
            ``message.content``), ``openai`` (POST to ``/v1/chat/completions``, read ``choices[0].message.content``)
            or ``auto`` (by the URL's path).
        api_key: sent as a Bearer token to OpenAI-compatible servers that need one.
        max_tokens: cap the reply (OpenAI ``max_tokens``, Ollama ``num_predict``); None sends the seed's payload.

    Raises:
        OSError: the server cannot be reached or answers with an HTTP error (message names the URL).
        ValueError: the reply is not the protocol's JSON.
    """
    api = detect_api(url) if api == "auto" else api
    messages = [{"role": "user", "content": prompt}]
    headers = {"Content-Type": "application/json"}
    if api == "ollama":
        payload: dict[str, Any] = {"model": model, "messages": messages, "options": dict(JUDGE_OPTIONS)}
        if max_tokens is not None:
            payload["options"]["num_predict"] = max_tokens
    elif api == "openai":
        url = openai_chat_url(url)
        payload = {"model": model, "messages": messages, "seed": JUDGE_OPTIONS["seed"],
                   "temperature": JUDGE_OPTIONS["temperature"], "stream": False}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
    else:
        raise ValueError(f"judge api must be auto, ollama or openai, got {api!r}")
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8")
    except OSError as exc:
        raise OSError(f"judge at {url} is not reachable: {exc}. Start it (ollama serve / python -m engine serve) "
                      f"or pass --judge-url") from exc
    try:
        if api == "ollama":
            return "".join(json.loads(line)["message"]["content"] for line in body.splitlines() if line.strip())
        return json.loads(body)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"judge at {url} sent a reply that is not {api} chat JSON: {body[:200]!r}") from exc


@dataclass
class JudgeResult:
    """Scores of the entries whose reply held a usable integer under ``rule``; ``skipped`` lists (index, reply) of
    the others and ``replies`` every reply in entry order."""

    scores: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    total: int = 0
    rule: str = "int"
    replies: list[str] = field(default_factory=list)

    @property
    def average(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    def summary(self) -> str:
        avg = "n/a" if self.average is None else f"{self.average:.2f}"
        return f"Parse rule: {PARSE_RULES[self.rule]}\n" \
               f"Number of scores: {len(self.scores)} of {self.total} ({len(self.skipped)} skipped)\n" \
               f"Average score: {avg}"


def generate_model_scores(entries: Sequence[dict[str, Any]], key: str = "model_response", *,
                          query: Callable[[str], str], rule: str = "int", progress: bool = True) -> JudgeResult:
    """The seed's ``generate_model_scores``: one judge query per entry, its reply parsed with ``rule`` (see
    :func:`parse_score`); a reply without a usable integer is logged, counted and skipped, never an error."""
    from tqdm.auto import tqdm

    if rule not in PARSE_RULES:
        raise ValueError(f"judge parse rule must be one of {sorted(PARSE_RULES)}, got {rule!r}")
    result = JudgeResult(total=len(entries), rule=rule)
    for i, entry in enumerate(tqdm(entries, desc="scoring", disable=not progress)):
        reply = query(judge_prompt(entry, key))
        result.replies.append(reply)
        score = parse_score(reply, rule)
        if score is None:
            log.warning("Could not convert score: %r (entry %d)", reply, i)
            result.skipped.append((i, reply))
        else:
            result.scores.append(score)
    return result
