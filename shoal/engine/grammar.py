"""Structured outputs: a request's StructuredOutputsParams (JSON schema, any JSON object, regex, choice or
grammar) compiled by llguidance into a matcher per sequence, and the batch's allowed-token masks built from
those matchers each step, for the sampler (shoal.layers.sampler.TokenMask) to apply.

llguidance (a Rust library with Python bindings and no dependencies) was measured against xgrammar on this
project's CPUs: see benchmarks/structured_mask.py and BENCHMARKS.md. It computes each mask lazily over the
tokenizer's trie, so a grammar compiles in about a millisecond and nothing is precomputed per schema.

A grammar is compiled once per distinct constraint (an LRU cache) into a prototype matcher; each sequence
takes a copy, advanced by its own sampled tokens. Under `start_after` (a reasoning model's "</think>") the
copy waits: its row is left unmasked, and its tokens are only watched, until the reply's text holds the
marker; the grammar then takes the tokens that follow it. Compiling happens off the engine's step loop where the
server can arrange it (`GrammarCompiler.compile` from its request thread); the engine copies the cached
prototype when the sequence is added.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from shoal.errors import InvalidRequestError
from shoal.layers.sampler import TokenMask
from shoal.sampling_params import StructuredOutputsParams

logger = logging.getLogger("shoal.engine")

CACHE_SIZE = 64  # compiled constraints kept
INSTALL_HINT = "structured outputs need the llguidance package: pip install llguidance"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise InvalidRequestError(INSTALL_HINT) from None
    return llguidance


class GrammarMatcher:
    """One sequence's position in its grammar: the tokens allowed next, advanced by each sampled token; with
    start_after, first the wait for that marker (`decode` turns the last few token ids into text)."""

    def __init__(self, matcher, vocab_size: int, start_after: str | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # the ids its masks cover
        self._start_after = start_after
        self._decode = decode
        self._recent: list[int] = []

    @property
    def active(self) -> bool:
        """The grammar constrains the next token (False while it waits for its start_after marker)."""
        return self._start_after is None

    def _watch(self, token: int) -> None:
        # Text, not token ids: the marker is found however the model spelled it in tokens. Every token that
        # writes part of it writes at least one of its characters, so the last len(marker) + 1 tokens hold it.
        self._recent = (self._recent + [token])[-len(self._start_after) - 1:]
        if self._start_after in self._decode(self._recent):
            self._start_after, self._recent = None, []

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask (one bit per token id, int32 words, little-endian) into `row`."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refused it (then the matcher stays in error, and its
        masks allow only the end of sequence). While waiting for start_after, the token is only watched."""
        if not self.active:
            self._watch(token)
            return True
        return self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and can take nothing more (only end of sequence)."""
        return self.active and self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; thread-safe (the server compiles from its request
    threads, the engine thread takes matchers)."""

    def __init__(self, tokenizer, eos_token_ids: Iterable[int], vocab_size: int) -> None:
        """`tokenizer`: shoal's Tokenizer; `vocab_size`: the model's (its logits' width), at least the tokenizer's."""
        self._hf = tokenizer._tok
        self._eos = sorted(eos_token_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.vocab_size = vocab_size
        self._tokenizer = None  # llguidance's view of the vocabulary, built at first use (~0.2 s for 128k tokens)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            llg = _llguidance()
            if not self._eos:
                raise InvalidRequestError("structured outputs need the model's end-of-sequence token, and this "
                                          "checkpoint names none (eos_token_id in config.json)")
            self._tokenizer = llg.LLTokenizer(self._hf.to_str(), n_vocab=self.vocab_size, eos_token=self._eos)
        return self._tokenizer

    def compile(self, spec: StructuredOutputsParams) -> None:
        """Compile and cache `spec`; raises InvalidRequestError (what is wrong, and where) if it cannot be."""
        self._prototype(spec)

    def matcher(self, spec: StructuredOutputsParams) -> GrammarMatcher:
        return GrammarMatcher(self._prototype(spec).deep_copy(), self._tokenizer.vocab_size, spec.start_after,
                              self._decode_with_special_tokens)

    def _decode_with_special_tokens(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)  # a marker may be a special token ("</think>")

    def _prototype(self, spec: StructuredOutputsParams):
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            tokenizer = self._ll_tokenizer()
        llg = _llguidance()
        try:
            grammar = _grammar_text(llg, spec)
            error = llg.LLMatcher.validate_grammar(grammar, tokenizer)
        except InvalidRequestError:
            raise
        except (ValueError, TypeError, RuntimeError) as exc:  # the library refusing its input is the request's fault
            raise InvalidRequestError(f"the {_kind(spec)} cannot be compiled: {_short(str(exc))}") from None
        if error:
            raise InvalidRequestError(f"the {_kind(spec)} cannot be compiled: {_short(error)}")
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"the {_kind(spec)} cannot be compiled: {_short(matcher.get_error())}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher


def _kind(spec: StructuredOutputsParams) -> str:
    if spec.json is not None or spec.json_object:
        return "JSON schema"
    return "regex" if spec.regex is not None else "choice" if spec.choice is not None else "grammar"


def _short(message: str, limit: int = 500) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + "..."


def _grammar_text(llg, spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for `spec`."""
    if spec.json is not None or spec.json_object:
        schema = {"type": "object"} if spec.json_object else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("a JSON schema is an object (or true / false)")
        options = {"whitespace_flexible": spec.whitespace_flexible}
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if spec.regex is not None:
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:  # Lark (llguidance's dialect), or GBNF (llama.cpp's) turned into it
        return llg.grammar_from("grammar", spec.grammar)
    except ValueError as exc:
        raise InvalidRequestError(f"the grammar cannot be read: {_short(str(exc))}") from None


def token_mask(matchers: Sequence[GrammarMatcher | None], vocab_size: int) -> TokenMask | None:
    """The allowed tokens of each row that has a matcher, over logits `vocab_size` wide, as the sampler applies
    them (None: no row has an active one). Ids past the matchers' vocabulary (logits padded wider) are never
    allowed."""
    rows = [row for row, m in enumerate(matchers) if m is not None and m.active]
    if not rows:
        return None
    covered = matchers[rows[0]].vocab_size  # one engine, one tokenizer: every matcher covers the same ids
    bits = np.zeros((len(rows), -(-covered // 32)), dtype=np.int32)
    for i, row in enumerate(rows):
        matchers[row].fill(bits[i])
    width = min(covered, vocab_size)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, count=width, bitorder="little")
    if width < vocab_size:
        allowed = np.pad(allowed, ((0, 0), (0, vocab_size - width)))
    return TokenMask(rows, torch.from_numpy(allowed).view(torch.bool))  # 0 / 1 bytes: a view, not a copy
