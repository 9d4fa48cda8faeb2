"""Every template of llama.cpp's corpus of real checkpoints' chat templates (tests/server/template_corpus.py)
renders token for token as transformers' apply_chat_template renders it, over every conversation of
chat_conversations (system prompts, several turns, tools, assistant tool_calls, tool results, earlier
reasoning, documents, template kwargs, continue_final_message), each taken through the server's own path.

The tokenizer is the tiny test one with bos "<s>" and eos "</s>", plus every marker the corpus's templates
write (<|im_start|>, [INST], <｜Assistant｜>, <think>, ...) as special tokens, as the real checkpoints have them,
so the token ids check that markers stay whole and no BOS is added twice, not only that the text matches.

Where transformers raises — the template refuses the conversation (Gemma 2: no system role; Llama 3.1: one tool
call at a time; Mistral: 9-character call ids; Command-R / Hermes: `tools` required) or trips over it (Kimi K2
calls list.append, which the sandbox both share forbids) — shoal must raise ChatTemplateError, which the server
answers as a 400 carrying the template's message: a prompt transformers would not render is never sent to the
model in its place.
"""

from __future__ import annotations

import re

import pytest
from chat_conversations import CASES, MORE_CASES, transformers_messages, transformers_options, server_conversation
from template_corpus import CorpusUnavailable, load_corpus

from shoal.chat_template import ChatTemplateError
from shoal.tokenizer import Tokenizer

CORPUS_CASES = CASES + MORE_CASES
# What a template writes as a marker: <|x|>, <｜x｜>, [X] / [/X], <x> / </x> inside its string literals.
_MARKER = re.compile(r"<\|[^|<>\s]{1,48}\|>|<｜[^｜<>\s]{1,48}｜>|\[/?[A-Z][A-Z_]{1,30}\]|</?[a-z][a-z_]{1,30}>")


def _corpus() -> dict[str, str] | CorpusUnavailable:
    try:
        return load_corpus()
    except CorpusUnavailable as exc:
        return exc


_CORPUS = None


def corpus() -> dict[str, str] | CorpusUnavailable:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = _corpus()
    return _CORPUS


def pytest_generate_tests(metafunc):
    if "template_name" in metafunc.fixturenames:
        found = corpus()
        names = sorted(found) if isinstance(found, dict) else \
            [pytest.param(None, marks=pytest.mark.skip(reason=f"the template corpus is unavailable: {found}"))]
        metafunc.parametrize("template_name", names)


@pytest.fixture(scope="module")
def tokenizer_pair(tmp_path_factory):
    """(the tokenizers.Tokenizer and tokenizer_config shoal's Tokenizer is built from, transformers' tokenizer)."""
    from checkpoints import write_tokenizer
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    found = corpus()
    if not isinstance(found, dict):
        pytest.skip(f"the template corpus is unavailable: {found}")
    folder = tmp_path_factory.mktemp("corpus-tokenizer")
    write_tokenizer(folder)
    markers = sorted({m for source in found.values() for m in _MARKER.findall(source)})
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    tok.save(str(folder / "tokenizer.json"))
    theirs = PreTrainedTokenizerFast.from_pretrained(str(folder))
    config = {"bos_token": theirs.bos_token, "eos_token": theirs.eos_token, "add_bos_token": True}
    return tok, config, theirs


def transformers_ids(source: str, theirs, messages: list[dict], options: dict) -> list[int] | Exception:
    try:
        return theirs.apply_chat_template(transformers_messages(messages), chat_template=source, tokenize=True,
                                          return_dict=False, **transformers_options(options))
    except Exception as exc:
        return exc


def render_both(source: str, tokenizer_pair, messages: list[dict], options: dict):
    """(transformers' token ids or the exception it raised, shoal's token ids or its ChatTemplateError)."""
    tok, config, theirs = tokenizer_pair
    expected = transformers_ids(source, theirs, messages, options)
    ours = Tokenizer.from_tokenizer(tok, {**config, "chat_template": source})
    chat = server_conversation(messages, options)
    try:
        got = ours.apply_chat_template(chat.messages, chat.add_generation_prompt, **chat.render_options())
    except ChatTemplateError as exc:
        got = exc
    return expected, got


@pytest.fixture(scope="module")
def renders(tokenizer_pair) -> dict[str, list[tuple[str, list[int] | Exception, list[int] | Exception]]]:
    """Template name -> (case, transformers' ids or error, shoal's ids or error) for every case: rendered once,
    template by template (each compiles once in each library), for both tests below."""
    return {name: [(case, *render_both(source, tokenizer_pair, m, o)) for case, m, o in CORPUS_CASES]
            for name, source in corpus().items()}


def test_renders_token_identical_to_transformers(template_name, tokenizer_pair, renders):
    _, _, theirs = tokenizer_pair
    wrong = []
    for case, expected, got in renders[template_name]:
        if isinstance(expected, Exception):
            if not isinstance(got, ChatTemplateError):
                wrong.append(f"{case}: transformers raises {type(expected).__name__}: {expected}, shoal renders")
        elif isinstance(got, Exception):
            wrong.append(f"{case}: transformers renders, shoal raises {got}")
        elif got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            wrong.append(f"{case}: token {at} differs; transformers "
                         f"{theirs.decode(expected[max(0, at - 8):at + 8], skip_special_tokens=False)!r}, shoal "
                         f"{theirs.decode(got[max(0, at - 8):at + 8], skip_special_tokens=False)!r}")
    assert not wrong, f"{template_name}:\n" + "\n".join(wrong)


def test_the_corpus_is_mostly_rendered(renders):
    """Guards the test above against passing on nothing: the corpus is whole, and transformers renders every
    template on some conversation but two: firefunction-v2 reads a `functions` variable that no caller of
    apply_chat_template passes, and Command R+'s tool_use template wants tools in Cohere's own shape (a top-level
    `description`, `parameter_definitions`), not OpenAI's {"type": "function", "function": ...}."""
    assert len(renders) >= 60, f"only {len(renders)} templates in the corpus"
    never = [name for name, results in renders.items() if all(isinstance(e, Exception) for _, e, _ in results)]
    assert never == ["CohereForAI-c4ai-command-r-plus-tool_use", "fireworks-ai-llama-3-firefunction-v2"]
