"""Tool-call parsers on the text each model family emits, fed whole and in chunks of every size from 1
character up: the content and the calls (names, arguments) must come out the same however it is cut."""

from __future__ import annotations

import json

import pytest

from shoal.server.tool_parsers import (
    PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
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


@pytest.mark.parametrize("parser_class, cases", [(HermesToolParser, HERMES), (Llama3JsonToolParser, LLAMA3)])
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
    assert parser_for_template("{{ messages }}") is None
    assert set(PARSERS) >= {"hermes", "qwen", "llama3_json"}
