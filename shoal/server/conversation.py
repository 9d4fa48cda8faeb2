"""Turns the messages, tools and template options of a chat request into what the checkpoint's chat
template is rendered with (shoal.chat_template), the way vLLM hands an OpenAI conversation to
transformers: every message whole — assistant `tool_calls` (their JSON arguments parsed into objects,
as tool-use templates expect), `tool` results with their `tool_call_id`, names, earlier reasoning — and
null content left null, for the template to see as missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shoal.server.protocol import RESERVED_TEMPLATE_NAMES, ChatMessage, RequestError, Tool


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def render_options(self) -> dict[str, Any]:
        return {"tools": self.tools, "documents": self.documents, "continue_final_message": self.continue_final_message,
                "template_kwargs": self.template_kwargs}

    def text_bytes(self) -> int:
        """The size the prompt bound applies to: message contents and everything else the template is handed."""
        size = 0
        for message in self.messages:
            content = message.get("content")
            size += len(content.encode("utf-8")) if isinstance(content, str) else 0
            rest = {k: v for k, v in message.items() if k not in ("content", "role")}
            if rest:
                size += len(json.dumps(rest, ensure_ascii=False).encode("utf-8"))
        for extra in (self.tools, self.documents, self.template_kwargs):
            if extra:
                size += len(json.dumps(extra, ensure_ascii=False).encode("utf-8"))
        return size


def template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise RequestError("only text content parts are supported by this server",
                                   param=f"messages.{index}.content", code="unsupported_content")
            parts.append(part.text)
        content = "".join(parts)
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except ValueError:
                    raise RequestError(f"the arguments of tool call {j} are not valid JSON",
                                       param=f"messages.{index}.tool_calls.{j}.function.arguments") from None
            entry: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
            if call.id is not None:
                entry = {"id": call.id, **entry}
            calls.append(entry)
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as the client sent them (fields it left out stay out), in OpenAI's {"type", "function"} form."""
    if not tools:
        return None
    names = [t.function.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise RequestError(f"two tools are named {duplicate!r}", param="tools")
    return [t.model_dump(exclude_unset=True) for t in tools]


def conversation(messages: list[ChatMessage], tools: list[Tool] | None, add_generation_prompt: bool,
                 continue_final_message: bool, template_kwargs: dict[str, Any] | None,
                 documents: list[dict[str, Any]] | None = None) -> Conversation:
    """Checks the template options and builds the Conversation (a RequestError names the bad field)."""
    if continue_final_message and add_generation_prompt:
        raise RequestError("continue_final_message needs add_generation_prompt set to false (continue the last "
                           "message, or start a new one)", param="continue_final_message")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_NAMES & kwargs.keys())
    if reserved:
        raise RequestError(f"chat_template_kwargs cannot set {reserved[0]!r}: the request's own field sets it",
                           param="chat_template_kwargs")
    bad = next((k for k in kwargs if not k.isidentifier()), None)
    if bad is not None:
        raise RequestError(f"chat_template_kwargs keys are template variable names, got {bad[:64]!r}",
                           param="chat_template_kwargs")
    return Conversation([template_message(m, i) for i, m in enumerate(messages)], tool_dicts(tools), documents,
                        add_generation_prompt, continue_final_message, kwargs)
