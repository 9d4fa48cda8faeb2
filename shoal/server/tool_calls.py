"""One chat request's tool calling: which parser reads the model's text, whether the parser's markers must
be kept in the text (a tokenizer that calls them special would skip them), and how a reply, whole or
streamed, becomes OpenAI content plus `tool_calls` with finish_reason "tool_calls"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.server.tool_parsers import PARSERS, Parsed, ToolCall


def markers_are_special(parser: str, token_to_id: Callable[[str], int | None],
                        is_special: Callable[[int], bool]) -> bool:
    ids = [token_to_id(m) for m in PARSERS[parser].markers]
    return any(i is not None and is_special(i) for i in ids)


@dataclass
class ToolCalling:
    parser: str
    parallel: bool  # parallel_tool_calls: false keeps only a choice's first call
    stop_texts: tuple[str, ...] = ()  # with special tokens kept: end-of-sequence texts cut from a stopped reply

    def _cut_stop(self, text: str, finish: str | None) -> str:
        if finish == "stop":
            for end in self.stop_texts:
                if end and text.endswith(end):
                    return text[: -len(end)]
        return text

    def _kept(self, calls: list[ToolCall], made: int) -> list[ToolCall]:
        return calls if self.parallel else calls[: max(0, 1 - made)]

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole reply -> (its assistant message, its finish_reason)."""
        text = self._cut_stop(text, finish)
        parsed = PARSERS[self.parser]().parse(text)
        calls = self._kept(parsed.tool_calls, 0)
        if not calls:
            return {"role": "assistant", "content": text}, finish
        content = parsed.content if parsed.content.strip() else None
        return {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}, "tool_calls"

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


class ToolCallStream:
    """One choice's streamed reply: each piece of text -> the delta to send (content and tool-call deltas)."""

    def __init__(self, calling: ToolCalling) -> None:
        self.calling, self.parser, self.made = calling, PARSERS[calling.parser](), 0

    def feed(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        parsed = self.parser.feed(self.calling._cut_stop(text, finish))  # the stop token came with the last piece
        if finish is not None:
            parsed += self.parser.finish()
        delta = self._delta(parsed)
        return delta, ("tool_calls" if finish is not None and self.made else finish)

    def _delta(self, parsed: Parsed) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": parsed.content} if parsed.content else {}
        calls = self.calling._kept(parsed.tool_calls, self.made)
        if calls:
            delta["tool_calls"] = [{"index": self.made + k, **c.openai()} for k, c in enumerate(calls)]
            self.made += len(calls)
        return delta
