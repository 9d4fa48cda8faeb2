"""Tool-call parsers: turn a model's text, as it streams, into OpenAI content and tool calls, in the formats
real checkpoints emit. `hermes` is the `<tool_call>{json}</tool_call>` form of Qwen2.5 / Qwen3 (and
Hermes); `llama3_json` is Llama 3.x's bare `{"name": ..., "parameters": {...}}` (several joined by `;`);
`deepseek_v3` reads DeepSeek V3 / R1 and V3.1 tool-call sections; `mistral` reads `[TOOL_CALLS]`.

A parser is fed text pieces of any size and answers with events — content text, or a whole tool call —
so that the same text gives the same result however it is cut (tests feed every chunk size from 1 up).
Text that looks like a call but does not parse is handed back as content: nothing the model wrote is lost.
The chat endpoint picks a parser from `--tool-call-parser` or from the markers in the chat template.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    """What one feed (or the finish) released: content text and completed tool calls, in that order."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


def _call_from(obj, argument_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _is_name(text: str) -> bool:
    return text.replace("_", "").replace("-", "").replace(".", "").isalnum() or text == ""


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of text could begin `tag` (held back until the next piece decides)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # the format's marker tokens (kept in the text when the tokenizer calls them special)

    def feed(self, text: str) -> Parsed:
        raise NotImplementedError

    def finish(self) -> Parsed:
        raise NotImplementedError

    def parse(self, text: str) -> Parsed:
        """The whole text at once (a response that is not streamed)."""
        out = self.feed(text)
        out += self.finish()
        return out


class HermesToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number, around content; whitespace
    between calls and after the last one is dropped, as Qwen's own parser does."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    markers = (OPEN, CLOSE)

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self._after_call = False  # whitespace after a call is held: it is dropped unless content follows

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        out = Parsed()
        while True:
            if self._inside:
                end = self._buffer.find(self.CLOSE)
                if end == -1:
                    return out
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(self.CLOSE):]
                self._inside = False
                call = self._call(body)
                if call is None:
                    out.content += self.OPEN + body + self.CLOSE
                    self._after_call = False
                else:
                    out.tool_calls.append(call)
                    self._after_call = True
                continue
            start = self._buffer.find(self.OPEN)
            if start != -1:
                before = self._buffer[:start]
                if not (self._after_call and not before.strip()):
                    out.content += before
                self._buffer = self._buffer[start + len(self.OPEN):]
                self._inside = True
                continue
            keep = _partial_suffix(self._buffer, self.OPEN)
            ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
            if self._after_call and not ready.strip():
                self._buffer = ready + self._buffer  # still only whitespace since the call: hold it
                return out
            out.content += ready
            self._after_call = False
            return out

    def finish(self) -> Parsed:
        out = Parsed()
        if self._inside:  # a call the model did not close (cut by max_tokens, or a missing end tag)
            call = self._call(self._buffer)
            if call is not None:
                out.tool_calls.append(call)
            else:
                out.content += self.OPEN + self._buffer
        elif not (self._after_call and not self._buffer.strip()):
            out.content += self._buffer
        self._buffer, self._inside = "", False
        return out

    @staticmethod
    def _call(body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        return _call_from(obj, ("arguments", "parameters"))


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x: an answer that starts with `{` (after `<|python_tag|>`, when special tokens are kept) is a
    list of `{"name": ..., "parameters": {...}}` objects joined by `;`, each released once it is whole; from
    the first thing that is not such an object (or one left unfinished at the end), the rest is content."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    markers = (PYTHON_TAG,)

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None until the first visible character decides: "content" or "calls"
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> Parsed:
        if self._mode == "content":
            return Parsed(content=text)
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if not head or (self.PYTHON_TAG.startswith(head) and len(head) < len(self.PYTHON_TAG)):
                return Parsed()  # nothing decides yet
            if head.startswith(self.PYTHON_TAG):
                head = head[len(self.PYTHON_TAG):].lstrip()
                if not head:
                    return Parsed()
            if not head.startswith("{"):
                self._mode = "content"
                out, self._buffer = Parsed(content=self._buffer), ""
                return out
            self._mode = "calls"
            self._buffer = head
        return self._release(final=False)

    def _release(self, final: bool) -> Parsed:
        out = Parsed()
        while True:
            body = self._buffer.lstrip()
            while body[:1] == ";":
                body = body[1:].lstrip()
            if not body:
                self._buffer = ""
                return out
            if not body.startswith("{"):
                return self._to_content(out, body)
            try:
                obj, end = self._decoder.raw_decode(body)
            except ValueError:
                if final:  # an object the model never finished
                    return self._to_content(out, body)
                self._buffer = body
                return out  # not whole yet
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return self._to_content(out, body)
            out.tool_calls.append(call)
            self._buffer = body[end:]

    def _to_content(self, out: Parsed, rest: str) -> Parsed:
        self._mode, self._buffer = "content", ""
        out.content += rest
        return out

    def finish(self) -> Parsed:
        if self._mode == "calls":
            return self._release(final=True)
        text, self._buffer = self._buffer, ""
        return Parsed(content=text)


class _SectionToolParser(ToolParser):
    """A format whose calls sit in a section opened by a marker: text before it is content, and a section
    that turns out not to parse is content too (calls already released stay)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False  # within the calls section
        self._failed = False  # the section did not parse: the rest is content

    def _fail(self, out: Parsed) -> Parsed:
        self._failed = True
        out.content += self._buffer
        self._buffer = ""
        return out


class DeepSeekToolParser(_SectionToolParser):
    """DeepSeek V3 / R1 (`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>`)
    and V3.1 (`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`), inside
    `<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`; each call is released once its end marker arrives."""

    name = "deepseek_v3"
    CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        out = Parsed()
        while True:
            if self._failed:
                out.content += self._buffer
                self._buffer = ""
                return out
            if not self._inside:
                start = self._buffer.find(self.CALLS_BEGIN)
                if start == -1:
                    keep = _partial_suffix(self._buffer, self.CALLS_BEGIN)
                    cut = len(self._buffer) - keep
                    out.content += self._buffer[:cut]
                    self._buffer = self._buffer[cut:]
                    return out
                out.content += self._buffer[:start]
                self._buffer = self._buffer[start + len(self.CALLS_BEGIN):]
                self._inside = True
                continue
            body = self._buffer.lstrip()
            if body.startswith(self.CALLS_END):
                self._buffer = body[len(self.CALLS_END):]
                self._inside = False
                continue
            if not body.startswith(self.CALL_BEGIN):
                if self.CALL_BEGIN.startswith(body) or self.CALLS_END.startswith(body):
                    return out  # a marker still arriving
                return self._fail(out)
            end = body.find(self.CALL_END)
            if end == -1:
                return out
            call = self._call(body[len(self.CALL_BEGIN):end])
            if call is None:
                return self._fail(out)
            out.tool_calls.append(call)
            self._buffer = body[end + len(self.CALL_END):]

    def finish(self) -> Parsed:
        out = Parsed()
        if self._inside and not self._failed:
            body = self._buffer.lstrip()
            if body.startswith(self.CALL_BEGIN):  # cut off before its end marker
                call = self._call(body[len(self.CALL_BEGIN):])
                if call is not None:
                    out.tool_calls.append(call)
                    body = ""
            if body and not body.startswith(self.CALLS_END):
                out.content += body
        else:
            out.content += self._buffer
        self._buffer = ""
        return out

    def _call(self, body: str) -> ToolCall | None:
        head, sep, rest = body.partition(self.SEP)
        if not sep:
            return None
        if head.strip() == "function":  # V3 / R1: the name, then the arguments in a json code block
            name, _, rest = rest.partition("\n")
            rest = rest.strip()
            if rest.startswith("```json"):
                rest = rest[len("```json"):]
            rest = rest.strip().removesuffix("```").strip()
        else:
            name = head
        try:
            arguments = json.loads(rest) if rest.strip() else {}
        except ValueError:
            return None
        return _call_from({"name": name.strip(), "arguments": arguments}, ("arguments",))


class MistralToolParser(_SectionToolParser):
    """Mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"} (before tokenizer v11) or, from v11 on,
    `NAME[ARGS]{...}` (repeated after further `[TOOL_CALLS]`); calls are released as each one closes."""

    name = "mistral"
    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
    markers = (TAG, ARGS)

    def __init__(self) -> None:
        super().__init__()
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        out = Parsed()
        if self._failed:
            out.content, self._buffer = self._buffer, ""
            return out
        if not self._inside:
            start = self._buffer.find(self.TAG)
            if start == -1:
                cut = len(self._buffer) - _partial_suffix(self._buffer, self.TAG)
                out.content, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return out
            out.content = self._buffer[:start]
            self._buffer = self._buffer[start + len(self.TAG):]
            self._inside = True
        out += self._release(final=False)
        return out

    def _release(self, final: bool) -> Parsed:
        out = Parsed()
        while True:
            body = self._buffer.lstrip()
            if body.startswith(self.TAG):
                body = body[len(self.TAG):].lstrip()
            self._buffer = body
            if not body or (not final and self.TAG.startswith(body)):
                return out
            if body.startswith("["):  # the JSON list form
                try:
                    items, end = self._decoder.raw_decode(body)
                except ValueError:
                    return self._fail(out) if final else out
                found = [_call_from(item, ("arguments", "parameters")) for item in items] if isinstance(
                    items, list) else [None]
                if not found or None in found:
                    return self._fail(out)
                out.tool_calls.extend(found)
                self._buffer = body[end:]
                continue
            name, sep, rest = body.partition(self.ARGS)
            if not sep:
                bracket = body.find("[")
                head, tail = (body, "") if bracket == -1 else (body[:bracket], body[bracket:])
                if final or not _is_name(head) or not self.ARGS.startswith(tail):
                    return self._fail(out)
                return out  # the name (or its [ARGS]) is still arriving
            if not _is_name(name.strip()):
                return self._fail(out)
            try:
                arguments, end = self._decoder.raw_decode(rest.lstrip())
            except ValueError:
                waiting = not final and (not rest.strip() or rest.lstrip().startswith("{"))
                return out if waiting else self._fail(out)
            call = _call_from({"name": name.strip(), "arguments": arguments}, ("arguments",))
            if call is None:
                return self._fail(out)
            out.tool_calls.append(call)
            self._buffer = rest.lstrip()[end:]

    def finish(self) -> Parsed:
        out = self._release(final=True) if self._inside and not self._failed else Parsed()
        out.content += self._buffer
        self._buffer = ""
        return out


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser, "qwen": HermesToolParser, "llama3_json": Llama3JsonToolParser,
    "deepseek_v3": DeepSeekToolParser, "mistral": MistralToolParser,
}


def parser_for_template(template: str | None) -> str | None:
    """The parser a chat template's own markers call for, or None when they name no format shoal reads."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "tool▁calls▁begin" in template:
        return "deepseek_v3"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters": ' in template):
        return "llama3_json"
    return None
