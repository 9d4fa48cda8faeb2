"""Tool-call parsers on the text each model family emits, fed whole and in chunks of every size from 1
character up: the content and the calls (names, arguments) must come out the same however it is cut."""

from __future__ import annotations

import json

import pytest

from scripted_engine import script_engine
from shoal.server.tool_parsers import (
    PARSERS,
    DeepSeekToolParser,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    Parsed,
    parser_for_template,
)


def chunked(parser_class, text: str, size: int) -> Parsed:
    parser, out = parser_class(), Parsed()
    for at in range(0, len(text), size):
        out += parser.feed(text[at : at + size])
    out += parser.finish()
    return out


def calls(parsed: Parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


HERMES = [
    # (model text, content, calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
     "Let me check.\n", [("get_weather", {"city": "Oslo", "unit": "C"}), ("get_time", {})]),
    ("Plain answer with a < sign and <tool but no call.", "Plain answer with a < sign and <tool but no call.", []),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}\n</tool_call>', "", [("f", {"x": [1, 2]})]),
    ('<tool_call>{"name": "Ünïcode_tool", "arguments": {"q": "日本語 ✓"}}</tool_call> and after', " and after",
     [("Ünïcode_tool", {"q": "日本語 ✓"})]),
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),  # handed back, not lost
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', "", [("f", {"a": 1})]),  # no end tag (cut off)
    ('<tool_call>\n{"name": "f", "arguments": {"a": ', '<tool_call>\n{"name": "f", "arguments": {"a": ', []),
    ("<think>\nhmm\n</think>\n\nNo tool needed.", "<think>\nhmm\n</think>\n\nNo tool needed.", []),
]

LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', "",
     [("a", {"x": 1}), ("b", {})]),
    ('  {"name": "a", "arguments": {"nested": {"deep": [1, {"k": "}"}]}}}  ', "",
     [("a", {"nested": {"deep": [1, {"k": "}"}]}})]),
    ("The weather is fine {really}.", "The weather is fine {really}.", []),
    ('{"name": "a", "parameters": {"x": 1}} then words', "then words", [("a", {"x": 1})]),
    ('{"not_a_call": true}', '{"not_a_call": true}', []),
    ('{"name": "a", "parameters": {"x": ', '{"name": "a", "parameters": {"x": ', []),  # cut off: content
    ("", "", []),
]

B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DEEPSEEK = [
    # V3 / R1
    (f'Let me look.{B}{CB}function{SEP}get_weather\n```json\n{{"city": "Paris"}}\n```{CE}\n'
     f'{CB}function{SEP}get_time\n```json\n{{}}\n```{CE}{E}', "Let me look.",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    # V3.1
    (f'{B}{CB}get_weather{SEP}{{"city": "Oslo", "unit": "C"}}{CE}{CB}get_time{SEP}{{}}{CE}{E}', "",
     [("get_weather", {"city": "Oslo", "unit": "C"}), ("get_time", {})]),
    ("No tools: a ｜ sign and <｜tool but nothing more.", "No tools: a ｜ sign and <｜tool but nothing more.", []),
    (f'{B}{CB}f{SEP}{{"a": 1}}', "", [("f", {"a": 1})]),  # cut off before the end markers
    (f"{B}not a call", "not a call", []),
    (f'{B}{CB}f{SEP}{{"a": 1}}{CE}{E} Done.', " Done.", [("f", {"a": 1})]),
]

MISTRAL = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
     "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("Just text with [brackets] and [TOOL but no call.", "Just text with [brackets] and [TOOL but no call.", []),
    ("Sure.[TOOL_CALLS]lookup.v2[ARGS]{\"q\": \"日本語\"}", "Sure.", [("lookup.v2", {"q": "日本語"})]),
    ("[TOOL_CALLS]not a name[ARGS]{}", "not a name[ARGS]{}", []),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": ', '[{"name": "f", "arguments": {"a": ', []),
]


@pytest.mark.parametrize("parser_class, cases", [(HermesToolParser, HERMES), (Llama3JsonToolParser, LLAMA3),
                                                 (DeepSeekToolParser, DEEPSEEK), (MistralToolParser, MISTRAL)])
def test_every_chunk_size_gives_the_same_content_and_calls(parser_class, cases):
    for text, content, expected_calls in cases:
        whole = parser_class().parse(text)
        assert (whole.content, calls(whole)) == (content, expected_calls), text
        for size in range(1, len(text) + 1):
            got = chunked(parser_class, text, size)
            assert (got.content, calls(got)) == (content, expected_calls), (text, size)


def test_content_streams_before_a_call_completes():
    parser = HermesToolParser()
    assert parser.feed("Sure, ").content == "Sure, "
    assert parser.feed("checking <tool").content == "checking "  # a possible tag is held back, nothing more
    out = parser.feed('_call>{"name": "f", "arguments": {}}')
    assert out.content == "" and out.tool_calls == []
    out = parser.feed("</tool_call>")
    assert [c.name for c in out.tool_calls] == ["f"]
    llama = Llama3JsonToolParser()
    assert llama.feed("Hello").content == "Hello"  # the first visible character decides: content
    llama = Llama3JsonToolParser()
    first = llama.feed('{"name": "a", "parameters": {}}; {"name"')
    assert [c.name for c in first.tool_calls] == ["a"]  # a whole call is released before the next one ends


def test_calls_have_openai_shape_and_unique_ids():
    out = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>' * 2)
    first, second = (c.openai() for c in out.tool_calls)
    assert first["type"] == "function" and first["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert first["id"].startswith("call_") and first["id"] != second["id"]


def test_the_parser_follows_the_template():
    assert parser_for_template("{{ '<tool_call>' }}") == "hermes"
    assert parser_for_template("<|python_tag|>") == "llama3_json"
    assert parser_for_template("{{ '<｜tool▁calls▁begin｜>' }}") == "deepseek_v3"
    assert parser_for_template("[TOOL_CALLS]") == "mistral"
    assert parser_for_template("{{ messages }}") is None
    assert set(PARSERS) >= {"hermes", "qwen", "llama3_json", "deepseek_v3", "mistral"}


# ---- through the server: a scripted engine writes the model's text, the official client reads the calls ----
QWEN_ANSWER = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory):
    from chat_checkpoints import long_context_checkpoint

    from shoal import LLM

    return serve(LLM(str(long_context_checkpoint(tmp_path_factory, "chatml_tools")), dtype="float32", progress=False))


@pytest.fixture
def scripted(server, monkeypatch):
    """The engine answers every completion with `text`, three characters a step (set scripted.text to change it)."""
    # special tokens are kept for this tokenizer (its <tool_call> is special)
    return script_engine(server, monkeypatch, QWEN_ANSWER + "</s>")


def test_chat_returns_parsed_tool_calls(server, scripted):
    from server_harness import MODEL

    out = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                  tools=TOOLS, n=2)
    assert [p.skip_special_tokens for p in scripted.params] == [False, False]  # or the markers would vanish
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking.\n"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {})]
        assert len({c.id for c in choice.message.tool_calls}) == 2
    single = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                     tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in single.choices[0].message.tool_calls] == ["get_weather"]
    plain = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                    tools=TOOLS, tool_choice="none")
    assert plain.choices[0].message.content == QWEN_ANSWER + "</s>"  # tool_choice none: text as the model wrote it
    assert plain.choices[0].message.tool_calls is None and scripted.params[0].skip_special_tokens is True


def test_chat_streams_tool_call_deltas(server, scripted):
    from server_harness import MODEL

    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paris?"}], tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict] = {}
    for c in chunks:
        for call in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    assert content == "Checking.\n"
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    scripted.text = "No tools needed, <b>fine</b>.</s>"
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paris?"}], tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "No tools needed, <b>fine</b>."
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
