"""Reasoning parsers: split a thinking model's `<think>...</think>` reasoning from its answer, as vLLM's
`--reasoning-parser` does, into the chat message's `reasoning_content` (and streamed deltas of it).

The reply starts in its reasoning (DeepSeek-R1's and Qwen3's templates may put `<think>` in the prompt, so
a `<think>` at the reply's start is dropped if it is there), and everything after `</think>` is content; a reply
with no `</think>` is all reasoning (it was cut off while thinking). Where the request turned thinking off
through chat_template_kwargs (Qwen3's `enable_thinking: false`; DeepSeek-V3.1 thinks only with
`thinking: true`), the whole reply is content.

Like the tool-call parsers, a parser is fed text pieces of any size and gives the same split however the text
is cut: a piece that may begin a marker is held back until the next one decides.
"""

from __future__ import annotations

from typing import Any

START, END = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """One reply's split; `thinking` False makes every piece content."""

    markers = (START, END)

    def __init__(self, thinking: bool = True) -> None:
        self._state = "start" if thinking else "content"
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """A piece of the reply -> (its reasoning, its content) released now."""
        reasoning, content = "", ""
        text = self._held + text
        self._held = ""
        if self._state == "start":
            stripped = text.lstrip()
            if stripped.startswith(START):
                text, self._state = stripped[len(START):], "reasoning"
            elif START.startswith(stripped):  # perhaps the opening tag, not complete yet
                self._held = text
                return "", ""
            else:
                self._state = "reasoning"
        if self._state == "reasoning":
            at = text.find(END)
            if at == -1:
                keep = _partial_suffix(text, END)
                self._held = text[len(text) - keep:] if keep else ""
                return text[: len(text) - keep], ""
            reasoning, text, self._state = text[:at], text[at + len(END):], "content"
        return reasoning, content + text

    def finish(self) -> tuple[str, str]:
        """What is still held at the end of the reply (a marker's beginning that never completed)."""
        held, self._held = self._held, ""
        if not held:
            return "", ""
        return ("", held) if self._state == "content" else (held, "")

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole reply -> (reasoning_content, content), each None when empty."""
        reasoning, content = self.feed(text)
        more_reasoning, more_content = self.finish()
        return (reasoning + more_reasoning) or None, (content + more_content) or None


def thinks(kind: str, template_kwargs: dict[str, Any] | None) -> bool:
    """Whether a reply under this reasoning parser starts in its reasoning (the request did not turn thinking off)."""
    kwargs = template_kwargs or {}
    if kind == "qwen3":
        return kwargs.get("enable_thinking", True) is not False
    if kind == "deepseek_v3":  # DeepSeek-V3.1: a hybrid that thinks only when asked to
        return kwargs.get("thinking", False) is True
    return True


REASONING_PARSERS = ("deepseek_r1", "deepseek_v3", "qwen3")


def reasoning_parser(kind: str, template_kwargs: dict[str, Any] | None) -> ReasoningParser:
    if kind not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {kind!r}; known: {', '.join(REASONING_PARSERS)}")
    return ReasoningParser(thinks(kind, template_kwargs))
