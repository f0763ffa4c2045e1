"""Prompt formats: one registry shared by the chat engine and the finetune package.

Each :class:`PromptFormat` renders a single example (``format`` + ``response``, what instruction finetuning trains
on) and a multi-turn chat history (``render`` / ``encode_chat``, what the engine prefills). Both go through the same
segments, so a model is always prompted exactly the way it was trained (Burkov, sec. 5.3: "inference must use the
same format as finetuning").

Formats (exact strings pinned in tests/test_prompts.py):

* ``alpaca``: Raschka ch. 7 ``format_input`` (seed g2)::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Input:            <- only when input is non-empty
      {input}

      ### Response:
      {output}

  Multi-turn: the preamble once, then every turn as a repeated ``\\n\\n### Instruction:\\n{user}`` /
  ``\\n\\n### Response:\\n{assistant}`` pair; the generation prompt ends with ``\\n\\n### Response:\\n``. A system
  prompt *replaces* the preamble (the preamble is Alpaca's system prompt); ``None`` keeps the preamble. The book
  prompts with ``format_input`` alone and lets the model write ``### Response:``; opening the answer ourselves
  tokenizes identically to training (the text before ``\\n\\n### Response:`` is a whole BPE prefix) and
  ``extract_response`` handles both.
* ``phi3``: the book's exercise 7.1 form (seed g3), ``<|user|>\\n{instruction}`` (+ ``\\n{input}``), response
  ``\\n<|assistant|>:\\n{output}``. Multi-turn: repeated ``<|user|>`` / ``<|assistant|>:`` blocks joined by ``\\n``. A
  system prompt goes first as ``<|system|>\\n{system}\\n``; without one nothing is added (the book has no system part).
* ``chatml``: the HF / SmolLM2 chat template, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message and
  ``<|im_start|>assistant\\n`` as the generation prompt (``format`` already ends with it); the response part is
  ``{output}<|im_end|>``. Burkov's variant (seed i.11) puts a ``\\n`` before every ``<|im_end|>`` and no ``\\n``
  after ``assistant``; we use the HF form because SmolLM2 was trained on it (pinned against SmolLM2's own template
  in the tests). No system message means no system block; SmolLM2's template would insert its default system
  prompt there, which the store records as the manifest's ``system_prompt`` for the engine to pass.
* ``none``: raw text. Turns are joined with ``\\n``; nothing is added.

Stop strings: Alpaca stops where a new section would begin (``\\n\\n### Instruction:``, ``### Input:``,
``### Response:``), Phi-3 at ``\\n<|user|>`` (and a new assistant/system block), ChatML at ``<|im_end|>`` as text
(for GPT-2 models finetuned on ChatML) on top of the tokenizer's EOS ids (SmolLM2's ``<|im_end|>`` id).

Template markers (``<|im_start|>``, ``<|user|>``, ...) become special ids only when the tokenizer has them as special
tokens (ChatML with SmolLM2's tokenizer); for GPT-2 they are plain text, as in the book. Message content is always
encoded as plain text, so a user cannot inject ``<|im_end|>`` or ``<|endoftext|>``.

Masking for finetuning uses the *encoded* prompt length: :meth:`PromptFormat.encode_example` returns
``(ids, prompt_len)`` with ``ids = encode(prompt) + encode(response)`` (litgpt data/base.py).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ROLES = ("system", "user", "assistant")

Segment = tuple[str, bool]  # (text, is_template_marker)


def _text(segments: Sequence[Segment]) -> str:
    return "".join(text for text, _ in segments)


def _split_system(messages: Sequence[dict]) -> tuple[str | None, list[dict]]:
    """Validate a chat history; return (system prompt or None, the user/assistant turns)."""
    if not messages:
        raise ValueError("messages is empty; pass at least one {'role': 'user', 'content': ...} message")
    system = None
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"a system message may only come first, found one at index {i}")
            system = content
        else:
            turns.append(m)
    return system, turns


class PromptFormat:
    """Base class: subclasses build segments; text and token ids are derived from them here."""

    name: str = ""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a response (checked on generated text only, with hold-back; see engine.generate)."""
    markers: tuple[str, ...] = ()
    """Template markers that are encoded as special ids when the tokenizer has them as special tokens."""
    default_system: str | None = None

    # ---- segments, implemented per format
    def _prompt_segments(self, instruction: str, input: str, system: str | None) -> list[Segment]:
        raise NotImplementedError

    def _response_segments(self, output: str) -> list[Segment]:
        raise NotImplementedError

    def _chat_segments(self, system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Segment]:
        raise NotImplementedError

    def _generation_segments(self) -> list[Segment]:
        """What follows a single-example prompt to open the answer (Alpaca: ``\n\n### Response:\n``)."""
        return []

    # ---- text
    def format(self, instruction: str, input: str = "", system: str | None = None) -> str:
        """The prompt text of one example (the book's ``format_input``), without the response part."""
        return _text(self._prompt_segments(instruction, input, system))

    def generation_prompt(self, instruction: str, input: str = "", system: str | None = None) -> str:
        """``format(...)`` plus the text that opens the answer: what the engine prefills for one example."""
        return _text(self._prompt_segments(instruction, input, system) + self._generation_segments())

    def response(self, output: str) -> str:
        """The response part appended to ``format(...)`` for training."""
        return _text(self._response_segments(output))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """A chat history (list of ``{"role", "content"}``) as text; see the module docstring per format."""
        system, turns = _split_system(messages)
        return _text(self._chat_segments(system, turns, add_generation_prompt))

    def extract_response(self, generated: str, prompt: str = "") -> str:
        """The answer part of generated text (seed: ``generated[len(prompt):].replace(marker, "").strip()``).

        Args:
            generated: the generated text, or prompt + generated text when ``prompt`` is given.
            prompt: the prompt text to slice off the front, as the book's ``generated_text[len(input_text):]``.
        """
        return generated[len(prompt):].strip()

    # ---- token ids
    @staticmethod
    def _units(segments: Sequence[Segment], tokenizer: Tokenizer) -> list[int | str]:
        """Segments as what gets encoded: special ids for markers that are special tokens here, and runs of text
        (consecutive plain segments joined)."""
        units: list[int | str] = []
        run: list[str] = []
        for text, is_marker in segments:
            if is_marker and tokenizer.is_special(text):
                if run:
                    units.append("".join(run))
                    run = []
                units.append(tokenizer.special_id(text))
            elif text:
                run.append(text)
        if run:
            units.append("".join(run))
        return units

    @staticmethod
    def _encode_units(units: Sequence[int | str], tokenizer: Tokenizer) -> list[int]:
        ids: list[int] = []
        for u in units:
            if isinstance(u, int):
                ids.append(u)
            else:
                ids += tokenizer.encode(u)
        return ids

    def encode_segments(self, segments: Sequence[Segment], tokenizer: Tokenizer) -> list[int]:
        """Encode segments: markers that are special tokens become their ids; runs of text are encoded together.

        Consecutive plain segments are joined before encoding so that, with no special markers (GPT-2), the ids
        equal ``tokenizer.encode(full_text)`` exactly.
        """
        return self._encode_units(self._units(segments, tokenizer), tokenizer)

    def encode_chat(self, messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True
                    ) -> list[int]:
        """Token ids of a chat history, ready to prefill (ends with the generation prompt by default)."""
        system, turns = _split_system(messages)
        return self.encode_segments(self._chat_segments(system, turns, add_generation_prompt), tokenizer)

    def encode_chat_reusing(self, messages: Sequence[dict], tokenizer: Tokenizer, reuse: Sequence[int],
                            add_generation_prompt: bool = True) -> tuple[list[int], int]:
        """Token ids of a chat history that keep the longest prefix of ``reuse`` that spells the rendered history,
        and encode only the rest; returns ``(ids, n_kept)``.

        A chat session passes the ids its KV cache holds: the last prompt and the answer's tokens as the model
        sampled them. Re-encoding the answer's text can split it differently (BPE has one canonical split, a sampled
        answer need not follow it), and every token after the first difference would be prefilled again. Kept ids
        must match the history unit for unit: a special id only where the template puts that marker, text tokens
        only where they decode to the text that follows (so user text that spells ``<|im_end|>`` never matches the
        special id). Text is compared as :class:`engine.tokenizer.StreamDecoder` renders the tokens, which is how
        the answer's text was made: bytes that are not UTF-8 (a sampled model can emit them) read as U+FFFD there
        and here alike, and the ids that spelled them are kept. The split falls on a character boundary (a kept
        prefix never ends inside a character's bytes). With nothing reusable this is :meth:`encode_chat`.
        """
        system, turns = _split_system(messages)
        units = self._units(self._chat_segments(system, turns, add_generation_prompt), tokenizer)
        specials = {tokenizer.special_id(t) for t in tokenizer.special_tokens}
        marks = [(0, 0, False)]  # (unit, character offset in it, bytes held back undecoded) after each kept token
        i, j, held = 0, 0, False
        utf8 = None  # the current text unit's incremental decoder
        for tid in reuse:
            if i >= len(units):
                break
            u = units[i]
            if isinstance(u, int):
                if tid != u:
                    break
                i, j = i + 1, 0
            else:
                if tid in specials:
                    break
                if j == 0 and not held:
                    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
                try:
                    piece = tokenizer.token_bytes(tid)
                except (KeyError, ValueError):  # an id past the tokenizer's vocabulary (a padded embedding)
                    break
                text = utf8.decode(piece) if piece else None
                if text is None or u[j : j + len(text)] != text:
                    break
                j += len(text)
                held = bool(utf8.getstate()[0])
                if j == len(u) and not held:
                    i, j = i + 1, 0
            marks.append((i, j, held))
        n = len(marks) - 1
        while n > 0 and marks[n][2]:
            n -= 1  # the kept tokens end inside a character's bytes: give those bytes back
        i, j, _ = marks[n]
        rest: list[int | str] = list(units[i:])
        if j:
            rest[0] = units[i][j:]
        return list(reuse[:n]) + self._encode_units(rest, tokenizer), n

    def encode_prompt(self, instruction: str, tokenizer: Tokenizer, input: str = "", system: str | None = None,
                      add_generation_prompt: bool = True) -> list[int]:
        """Ids of one example's prompt; ``add_generation_prompt`` appends the text that opens the answer."""
        segments = self._prompt_segments(instruction, input, system)
        if add_generation_prompt:
            segments = segments + self._generation_segments()
        return self.encode_segments(segments, tokenizer)

    def encode_example(self, instruction: str, input: str, output: str, tokenizer: Tokenizer,
                       system: str | None = None) -> tuple[list[int], int]:
        """Ids of prompt + response for finetuning, and the prompt's encoded length (for -100 masking).

        ``ids = encode(format(instruction, input)) + encode(response(output))``; no EOS is appended (the collate
        function adds it). ``ids[:prompt_len]`` is exactly the prompt the engine prefills at inference.
        """
        prompt = self.encode_segments(self._prompt_segments(instruction, input, system), tokenizer)
        response = self.encode_segments(self._response_segments(output), tokenizer)
        return prompt + response, len(prompt)


class AlpacaFormat(PromptFormat):
    name = "alpaca"
    # The model must not write the next turn: stop where a new section would start.
    stop_strings = ("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:")
    default_system = ALPACA_PREAMBLE

    def _preamble(self, system: str | None) -> str:
        return ALPACA_PREAMBLE if system is None else system

    def _prompt_segments(self, instruction: str, input: str, system: str | None) -> list[Segment]:
        text = f"{self._preamble(system)}\n\n### Instruction:\n{instruction}"
        if input:
            text += f"\n\n### Input:\n{input}"
        return [(text, False)]

    def _response_segments(self, output: str) -> list[Segment]:
        return [(f"\n\n### Response:\n{output}", False)]

    def _generation_segments(self) -> list[Segment]:
        return self._response_segments("")

    def _chat_segments(self, system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Segment]:
        out = [(self._preamble(system), False)]
        for m in turns:
            header = "\n\n### Instruction:\n" if m["role"] == "user" else "\n\n### Response:\n"
            out.append((header + m["content"], False))
        if add_generation_prompt and turns and turns[-1]["role"] == "user":
            out += self._generation_segments()
        return out

    def extract_response(self, generated: str, prompt: str = "") -> str:
        return generated[len(prompt):].replace("### Response:", "").strip()


class Phi3Format(PromptFormat):
    name = "phi3"
    stop_strings = ("\n<|user|>", "\n<|assistant|>", "\n<|system|>")
    markers = ("<|system|>", "<|user|>", "<|assistant|>")

    def _prompt_segments(self, instruction: str, input: str, system: str | None) -> list[Segment]:
        out = self._system_segments(system)
        out += [("<|user|>", True), (f"\n{instruction}" + (f"\n{input}" if input else ""), False)]
        return out

    @staticmethod
    def _system_segments(system: str | None) -> list[Segment]:
        return [] if system is None else [("<|system|>", True), (f"\n{system}\n", False)]

    def _response_segments(self, output: str) -> list[Segment]:
        return [("\n", False), ("<|assistant|>", True), (f":\n{output}", False)]

    def _generation_segments(self) -> list[Segment]:
        return self._response_segments("")

    def _chat_segments(self, system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Segment]:
        out = self._system_segments(system)
        for i, m in enumerate(turns):
            if m["role"] == "user":
                out += ([("\n", False)] if i else []) + [("<|user|>", True), ("\n" + m["content"], False)]
            else:
                out += self._response_segments(m["content"])
        if add_generation_prompt and turns and turns[-1]["role"] == "user":
            out += self._generation_segments()
        return out

    def extract_response(self, generated: str, prompt: str = "") -> str:
        return generated[len(prompt):].replace("<|assistant|>:", "").strip()


class ChatMLFormat(PromptFormat):
    name = "chatml"
    stop_strings = ("<|im_end|>", "<|im_start|>")
    markers = ("<|im_start|>", "<|im_end|>")

    @staticmethod
    def _message(role: str, content: str) -> list[Segment]:
        return [("<|im_start|>", True), (f"{role}\n{content}", False), ("<|im_end|>", True), ("\n", False)]

    def _prompt_segments(self, instruction: str, input: str, system: str | None) -> list[Segment]:
        content = instruction + (f"\n\n{input}" if input else "")
        out = self._message("system", system) if system is not None else []
        return out + self._message("user", content) + [("<|im_start|>", True), ("assistant\n", False)]

    def _response_segments(self, output: str) -> list[Segment]:
        return [(output, False), ("<|im_end|>", True)]

    def _chat_segments(self, system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Segment]:
        out = self._message("system", system) if system is not None else []
        for m in turns:
            out += self._message(m["role"], m["content"])
        if add_generation_prompt:
            out += [("<|im_start|>", True), ("assistant\n", False)]
        return out

    def extract_response(self, generated: str, prompt: str = "") -> str:
        return generated[len(prompt):].replace("<|im_end|>", "").strip()


class RawFormat(PromptFormat):
    name = "none"

    def _prompt_segments(self, instruction: str, input: str, system: str | None) -> list[Segment]:
        parts = ([system] if system else []) + [instruction] + ([input] if input else [])
        return [("\n".join(parts), False)]

    def _response_segments(self, output: str) -> list[Segment]:
        return [(output, False)]

    def _chat_segments(self, system: str | None, turns: list[dict], add_generation_prompt: bool) -> list[Segment]:
        parts = ([system] if system else []) + [m["content"] for m in turns]
        return [("\n".join(parts), False)]


PROMPT_FORMATS: dict[str, PromptFormat] = {
    f.name: f for f in (AlpacaFormat(), Phi3Format(), ChatMLFormat(), RawFormat())
}


def get_prompt_format(name: str) -> PromptFormat:
    """Look up a format by exact name (``alpaca``, ``phi3``, ``chatml``, ``none``)."""
    try:
        return PROMPT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt format {name!r}; known formats: {', '.join(PROMPT_FORMATS)}") from None
