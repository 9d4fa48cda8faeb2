"""The tokenizer read from GGUF metadata encodes, decodes and templates like the checkpoint's own files."""

from __future__ import annotations

import pytest

from shoal.gguf import GGUFFile
from shoal.gguf.tokenizer import gguf_tokenizer
from shoal.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café — 日本語 ✓.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "<s>special</s> tokens inside text",
    "numbers 1234567 and punctuation!?;:'s 're",
    "",
]


@pytest.fixture(scope="module")
def tokenizers(gguf_model):
    path, folder, _, _ = gguf_model("llama", "Q4_0")
    return gguf_tokenizer(GGUFFile(path), 384), Tokenizer(folder, 384)


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_bpe_encodes_and_decodes_like_tokenizer_json(tokenizers, text):
    ours, theirs = tokenizers
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == theirs.encode(text, add_special_tokens=special)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_chat_template(tokenizers):
    ours, theirs = tokenizers
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == (0, 1, True)
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
    assert ours.chat_template == theirs.chat_template
    assert ours.is_special(0) and ours.is_special(1) and not ours.is_special(100)
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages)


def test_transformers_reads_the_same_tokenizer_from_the_gguf(gguf_model, tokenizers):
    import transformers

    path, _, _, _ = gguf_model("llama", "Q4_0")
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours, _ = tokenizers
    for text in TEXTS[:3]:
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False).input_ids
