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


def _spm_reference(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer: merge the adjacent pair whose join scores highest (leftmost on
    ties) until none is in the vocabulary; pieces left unknown fall back to their UTF-8 bytes."""
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in vocab and (best is None or scores[vocab[joined]] > best[0]):
                best = (scores[vocab[joined]], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        ids.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])
    return ids


def test_llama_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path):
    import gguf
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(TEXTS[:2] * 20, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    pieces = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]  # SentencePiece BPE: earlier merges score higher
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = gguf_tokenizer(GGUFFile(tmp_path / "spm.gguf"))
    vocab = {t: i for i, t in enumerate(tokens)}
    for text in ["The quick brown fox", "Héllo wörld, naïve café", "unseen ÿ€ 日本語 ✓ words", "lazy  dog."]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _spm_reference(text, vocab, scores), text
        assert tok.decode(ids) == text
    assert tok.encode("fox")[0] == 1 and tok.add_bos_token  # SentencePiece vocabularies add BOS by default


def test_full_vocabulary_tokenizer_gives_every_id_text_in_the_folder_and_the_gguf(tmp_path):
    """The benchmark checkpoints' tokenizer (tests/checkpoints.py: write_full_tokenizer): every id but
    <s> and </s> decodes to text of its own, so a random model's tokens stream one by one."""
    import checkpoints
    import gguf
    from hf_to_gguf import _tokenizer

    vocab_size = 3000
    checkpoints.write_tokenizer(tmp_path)
    assert not checkpoints.tokenizer_has_full_vocab(tmp_path, vocab_size)
    checkpoints.write_full_tokenizer(tmp_path, vocab_size)
    assert checkpoints.tokenizer_has_full_vocab(tmp_path, vocab_size)
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    _tokenizer(writer, tmp_path, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = Tokenizer(tmp_path, vocab_size)
    ours = gguf_tokenizer(GGUFFile(tmp_path / "tok.gguf"), vocab_size)
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id) == (vocab_size, 0, 1)
    assert ours.chat_template == folder.chat_template
    for i in range(2, vocab_size):
        assert folder.decode([i]) and ours.decode([i]) == folder.decode([i]), i
    for text in TEXTS:
        assert ours.encode(text) == folder.encode(text)
        assert folder.decode(folder.encode(text)) == text.replace("<s>", "").replace("</s>", "")
    with pytest.raises(ValueError, match="larger vocab_size"):
        checkpoints.write_full_tokenizer(tmp_path, 100)
