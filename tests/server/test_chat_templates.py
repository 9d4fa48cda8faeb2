"""Chat templates render token for token as transformers' apply_chat_template renders them: three templates
in the shapes real checkpoints ship (ChatML with <tool_call>, Llama 3.x, DeepSeek V3; tests/server/templates),
and the real Llama 4 and SmolVLM templates that transformers' own source ships (taken at run time), over
conversations with system prompts, several turns, tools, assistant tool_calls, tool results, earlier
reasoning, documents, template kwargs and continue_final_message; then the same through the server, whose
OpenAI-format history (JSON-string arguments, null content) must reach the template whole."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from chat_checkpoints import MARKERS, long_context_checkpoint, shipped_templates, write_tokenizer_dir
from chat_conversations import CASES, ONE_CALL, PARTIAL, PLAIN, REASONED, TIME, TWO_CALLS, WEATHER, drops_null_keys, \
    server_conversation, transformers_messages, transformers_options
from server_harness import MODEL

from shoal import LLM
from shoal.chat_template import ChatTemplateError
from shoal.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizers(llama, tmp_path_factory):
    """template name -> (shoal Tokenizer, transformers tokenizer), both from the same files."""
    from transformers import PreTrainedTokenizerFast

    pairs = {}
    sources = {name: (None, None) for name in MARKERS} | shipped_templates()
    for name, (template, markers) in sources.items():
        folder = tmp_path_factory.mktemp(name)
        write_tokenizer_dir(llama[0], folder, name, template, markers)
        pairs[name] = (Tokenizer(folder), PreTrainedTokenizerFast.from_pretrained(str(folder)))
    return pairs


TEMPLATE_NAMES = sorted(MARKERS) + ["llama4", "smolvlm"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@pytest.mark.parametrize("case, messages, options", CASES, ids=[c[0] for c in CASES])
def test_renders_token_identical_to_transformers(tokenizers, name, case, messages, options):
    if name not in tokenizers:
        pytest.skip(f"this transformers does not ship the {name} template")
    if any(None in m.values() for m in messages) and not drops_null_keys():
        pytest.skip("this transformers hands null content to the template; shoal follows the newer one that leaves "
                    "it out, as templates test for a missing key")
    ours, theirs = tokenizers[name]
    expected_error = None
    try:
        expected = theirs.apply_chat_template(transformers_messages(messages), tokenize=True, return_dict=False,
                                              **transformers_options(options))
    except Exception as exc:  # the template refuses this conversation (Llama 3: one tool call at a time)
        expected_error = exc
    # Through the server's own path: the request parsed, then the conversation handed to the template.
    chat = server_conversation(messages, options)
    if expected_error is not None:
        with pytest.raises(ChatTemplateError):
            ours.apply_chat_template(chat.messages, chat.add_generation_prompt, **chat.render_options())
        # The refusals expected: Llama 3 shows one tool call at a time; SmolVLM's template (no tools) indexes the
        # content of an assistant turn that has none.
        assert (name, case) in {("llama3_tools", "two tool calls, two results, more turns"),
                                ("smolvlm", "one tool call and its result")}
        return
    got = ours.apply_chat_template(chat.messages, chat.add_generation_prompt, **chat.render_options())
    assert got == expected
    assert ours.render_chat(chat.messages, chat.add_generation_prompt, **chat.render_options()) == \
        theirs.decode(expected, skip_special_tokens=False)


def test_null_content_and_tool_calls_reach_the_template(tokenizers):
    ours, _ = tokenizers["chatml_tools"]
    from shoal.server.conversation import conversation
    from shoal.server.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate_json(json.dumps({"messages": ONE_CALL, "tools": [WEATHER]}))
    chat = conversation(request.messages, request.tools, True, False, None)
    text = ours.render_chat(chat.messages, True, **chat.render_options())
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert "None" not in text  # null content is absent to the template, never the string 'None'
    assert '"description": "The weather in a city, now."' in text


def test_template_features_transformers_has(tokenizers):
    ours, _ = tokenizers["llama3_tools"]
    from datetime import datetime

    text = ours.render_chat(PLAIN, True)
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}" in text  # strftime_now, not a fixed date
    with pytest.raises(ChatTemplateError, match="only supports single tool-calls"):
        ours.render_chat(transformers_messages(TWO_CALLS), True, tools=[WEATHER, TIME])
    deepseek, _ = tokenizers["deepseek_tools"]
    with pytest.raises(ChatTemplateError, match="got narrator"):  # raise_exception's message reaches the client
        deepseek.render_chat([{"role": "narrator", "content": "x"}], True)


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory):
    return serve(LLM(str(long_context_checkpoint(tmp_path_factory, "chatml_tools")), dtype="float32", progress=False))


def test_the_server_hands_history_and_tools_to_the_template(server, tokenizers):
    _, theirs = tokenizers["chatml_tools"]
    for messages, tools, kwargs in [(ONE_CALL, [WEATHER], {}), (TWO_CALLS, [WEATHER, TIME], {}),
                                    (REASONED, None, {"enable_thinking": False})]:
        expected = theirs.apply_chat_template(transformers_messages(messages), tools=tools, tokenize=True,
                                              return_dict=False, add_generation_prompt=True, **kwargs)
        body = {"model": MODEL, "messages": messages, "chat_template_kwargs": kwargs}
        if tools:
            body["tools"] = tools
        assert server.post("/tokenize", json=body).json()["tokens"] == expected
        out = server.client().chat.completions.create(model=MODEL, messages=messages, tools=tools or openai.omit,
                                                      max_tokens=1, extra_body={"chat_template_kwargs": kwargs})
        assert out.usage.prompt_tokens == len(expected)


def test_continue_final_message_through_the_server(server, tokenizers):
    _, theirs = tokenizers["chatml_tools"]
    expected = theirs.apply_chat_template(PARTIAL, tokenize=True, return_dict=False, continue_final_message=True)
    out = server.client().chat.completions.create(
        model=MODEL, messages=PARTIAL, max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert out.usage.prompt_tokens == len(expected)


def test_a_template_that_refuses_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "narrator", "content": "x"}],
                                                max_tokens=1)
    assert "unknown role: narrator" in caught.value.response.json()["error"]["message"]



def test_named_templates_and_special_tokens_map_as_transformers_reads_them(llama, tmp_path):
    from transformers import PreTrainedTokenizerFast

    shutil.copy(llama[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": [{"name": "default", "template": "{{ pad_token }}{% for m in messages %}{{ m.content }}{% endfor %}"},
                          {"name": "tool_use", "template": "{{ tools | length }} tools: {{ messages[0].content }}"}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<s>", "eos_token": "</s>"}))
    ours, theirs = Tokenizer(tmp_path), PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for tools in (None, [WEATHER]):
        expected = theirs.apply_chat_template(PLAIN[:2], tools=tools, tokenize=False)
        assert ours.render_chat(PLAIN[:2], False, tools=tools) == expected
    assert ours.render_chat(PLAIN[:2], False).startswith("<s>")  # pad_token from special_tokens_map.json
