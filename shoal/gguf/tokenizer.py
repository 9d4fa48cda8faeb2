"""The tokenizer stored in a GGUF file's metadata -> a `tokenizers.Tokenizer` wrapped in shoal's Tokenizer.

Two of llama.cpp's vocabulary kinds (`tokenizer.ggml.model`):
  gpt2   byte-level BPE: tokens + merges, pre-tokenized by the regex `tokenizer.ggml.pre` names;
  llama  SentencePiece BPE: tokens + scores with byte fallback (<0xNN> tokens); merges are rebuilt
         from the scores the way transformers converts a SentencePiece model.
Control tokens become special added tokens, user-defined ones plain added tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from shoal.errors import TokenizerError
from shoal.gguf.reader import GGUFFile
from shoal.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> (split regex, ignore_merges)
PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT, False),
    "gpt-2": (_GPT2_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, True),
    "llama3": (_LLAMA3_SPLIT, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}


def _added_tokens(tok, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """Token -> id, leaving out UNUSED padding entries: llama.cpp decodes them to nothing, and so does this."""
    vocab: dict[str, int] = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind != UNUSED:
            vocab.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp's lookup does
    return vocab


def _gpt2(file: GGUFFile, tokens: list[str], types: list[int]):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    merges = file.metadata("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise TokenizerError(f"{file.path}: a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges, which is missing")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"{file.path}: tokenizer.ggml.merges holds {merge!r}, not two tokens")
        pairs.append((left, right))
    pre = file.metadata("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        log.warning("GGUF pre-tokenizer %r is not known to shoal; splitting words as GPT-2 does", pre)
    split, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    tok = HFTokenizer(models.BPE(vocab=_vocab(tokens, types), merges=pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps scores, not merges: every split of a piece into two pieces is a merge,
    ranked by the merged piece's score (higher first), as transformers' converter does."""
    ranked = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _llama(file: GGUFFile, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    scores = file.metadata("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise TokenizerError(f"{file.path}: a llama (SentencePiece) vocabulary needs one score per token")
    vocab = _vocab(tokens, types)
    unk_id = file.metadata("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    merges = _spm_merges(tokens, scores, types, vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    prefix = bool(file.metadata("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def gguf_tokenizer(file: GGUFFile, model_vocab_size: int | None = None) -> Tokenizer:
    """shoal's Tokenizer for the vocabulary in the file's metadata, with its BOS/EOS and chat template."""
    kind = file.metadata("tokenizer.ggml.model")
    tokens = file.metadata("tokenizer.ggml.tokens")
    if kind is None or not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{file.path} has no tokenizer in its metadata (tokenizer.ggml.model / tokens)")
    types = file.metadata("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{file.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        tok = _gpt2(file, tokens, types)
    elif kind == "llama":
        tok = _llama(file, tokens, types)
    else:
        raise TokenizerError(
            f"{file.path} uses a {kind!r} tokenizer; shoal reads the GGUF tokenizers gpt2 (byte-level BPE) and "
            "llama (SentencePiece BPE)"
        )
    _added_tokens(tok, tokens, types)

    def token(key: str) -> str | None:
        index = file.metadata(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    config: dict[str, Any] = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        # llama.cpp adds BOS unless told otherwise (SentencePiece vocabularies) or told to
        "add_bos_token": bool(file.metadata("tokenizer.ggml.add_bos_token", kind == "llama")),
        "chat_template": file.metadata("tokenizer.chat_template"),
    }
    return Tokenizer.from_tokenizer(tok, config, model_vocab_size)
