"""Renders a checkpoint's chat template exactly as transformers' `apply_chat_template` does: the same
sandboxed jinja environment (loop controls, the `generation` tag, `raise_exception`, `strftime_now`,
`tojson` with its options, the guarded `dict` and `namespace`), the same preparation of messages (keys
whose value is null dropped, reasoning aliased under the names templates read) and the same
`continue_final_message` cut. The Tokenizer calls it; the server hands it tools and template kwargs.

A checkpoint's template is untrusted code: besides the sandbox (no attribute escapes), rendering is
bounded in time (RENDER_TIMEOUT_S: a watchdog interrupts the rendering thread) and in size
(RENDER_MAX_CHARS, checked as the output streams and before `*` builds a string or list), so a
template bomb is a 400 naming the template, never a hung or killed server.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from shoal.errors import TokenizerError

# The names a message's reasoning is passed under (transformers'): templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Named special tokens every template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(TokenizerError):
    """The template refused the conversation (raise_exception) or failed while rendering it."""


RENDER_TIMEOUT_S = 2.0
RENDER_MAX_CHARS = 4 << 20
_MAX_POWER_DIGITS = 4096  # `**` in a template may make an int of at most this many bits


class _RenderTimeout(BaseException):
    """Raised inside a rendering thread by the watchdog (BaseException: no template except-clause eats it)."""


class _TooLarge(Exception):
    pass


@lru_cache(maxsize=16)
def compile_template(source: str):
    """One compiled template per source text (a server renders the same one for every request)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON, with these options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` in a template, without the class's attributes
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace that refuses underscore names, so a template cannot reach interpreter internals through it
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # `'x' * 100000000` is one C call the watchdog cannot interrupt: refuse it before it allocates.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                            and len(seq) * times > RENDER_MAX_CHARS:
                        raise _TooLarge(f"repeats a {type(seq).__name__} of {len(seq)} {times} times")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right * max(1, abs(left).bit_length()) > _MAX_POWER_DIGITS:
                raise _TooLarge(f"raises {left} to the power {right}")
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


def plain_data(value: Any) -> Any:
    """What a template may see: JSON types only (anything else becomes an inert '<TypeName>' string)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return f"<{type(value).__name__}>"


def prepare_messages(messages: list[dict]) -> list[dict]:
    """transformers' normalisation: keys whose value is null are dropped (templates test for a missing key,
    and many print a null as 'None'), and reasoning is copied under each name templates read."""
    prepared = []
    for message in messages:
        message = {k: plain_data(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def render(
    source: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    special_tokens: Mapping[str, str] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The text transformers' apply_chat_template(..., tokenize=False) returns for the same arguments;
    template_kwargs overwrite the special tokens, as transformers' **kwargs do."""
    import jinja2

    if not messages:
        raise ChatTemplateError("the conversation is empty; give at least one message")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set: continue "
                                "the last message, or start a new assistant one")
    template = compile_template(source)
    chat = prepare_messages(messages)
    final_text = None
    if continue_final_message:
        key = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_text = chat[-1].get(key)
        if final_text is None:
            raise ChatTemplateError(f"continue_final_message is set but the last message has no {key!r} to continue")
        keys = [key]
        if key in _REASONING_FIELDS:
            keys = [k for k in _REASONING_FIELDS if chat[-1].get(k) == final_text]
        if not any(k in source for k in keys):
            raise ChatTemplateError(f"continue_final_message names {key!r}, which this chat template never reads")
        if isinstance(final_text, list):
            for block in reversed(final_text):
                if isinstance(block, dict) and "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message is set but the last message has no text to continue")
        elif isinstance(final_text, str):
            for k in keys:
                chat[-1][k] = chat[-1][k] + _CONTINUE_TAG
        else:
            raise ChatTemplateError("continue_final_message needs the last message's content to be text")
    variables = {**(special_tokens or {}), **plain_data(dict(template_kwargs or {}))}
    try:
        text = _bounded_render(template, dict(messages=chat, tools=plain_data(tools), documents=plain_data(documents),
                                              add_generation_prompt=add_generation_prompt, **variables))
    except _RenderTimeout:
        raise ChatTemplateError(f"the checkpoint's chat template took more than {RENDER_TIMEOUT_S:g} s to render "
                                "this conversation; the template is broken or hostile — fix or replace it "
                                "(tokenizer_config.json's chat_template)") from None
    except _TooLarge as exc:
        raise ChatTemplateError(f"the checkpoint's chat template renders more than {RENDER_MAX_CHARS} characters "
                                f"({exc}); the template is broken or hostile — fix or replace it "
                                "(tokenizer_config.json's chat_template)") from None
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template rejected the conversation: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
            RecursionError) as exc:
        # A template that trips over an unusual conversation is the request's problem, not the server's.
        raise ChatTemplateError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message is set but the chat template drops part of the last "
                                    "message, so it cannot be continued")
        at = text.rindex(tag)
        text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def _bounded_render(template, variables: dict) -> str:
    """template.render(**variables), cut off after RENDER_TIMEOUT_S (_RenderTimeout) or RENDER_MAX_CHARS (_TooLarge).

    The watchdog raises _RenderTimeout in this thread asynchronously (PyThreadState_SetAsyncExc), which
    stops a pure-Python loop at its next instruction; the lock keeps it from firing once rendering is over."""
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"rendering": True, "fired": False}

    def interrupt() -> None:
        with lock:
            if state["rendering"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_RenderTimeout))

    watchdog = threading.Timer(RENDER_TIMEOUT_S, interrupt)
    watchdog.daemon = True
    pieces, size = [], 0
    try:
        watchdog.start()
        for piece in template.generate(**variables):
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                raise _TooLarge(f"{size} characters so far")
            pieces.append(piece)
    except _RenderTimeout:
        pass
    finally:
        watchdog.cancel()
        with lock:
            state["rendering"] = False
            if state["fired"]:  # a pending interrupt that has not been raised yet must not fire later
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
    if state["fired"]:
        raise _RenderTimeout()
    return "".join(pieces)
