"""Text <-> token ids for a checkpoint: tokenizer.json through the `tokenizers` library, special tokens
and the chat template from tokenizer_config.json, and detokenization that streams without ever
splitting a multi-byte character.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shoal.chat_template import SPECIAL_TOKEN_NAMES, render
from shoal.errors import TokenizerError


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, path: Path, model_vocab_size: int | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {path}; shoal needs the fast-tokenizer file "
                "(transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes it)"
            )
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"cannot read {file}: {exc}") from None
        config: dict[str, Any] = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"cannot read {config_file}: {exc}") from None
        map_file = path / "special_tokens_map.json"
        if map_file.is_file():  # transformers reads named special tokens from here too (config.json wins)
            try:
                named = json.loads(map_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"cannot read {map_file}: {exc}") from None
            if isinstance(named, dict):
                config = {**{k: v for k, v in named.items() if k in SPECIAL_TOKEN_NAMES}, **config}
        jinja_file = path / "chat_template.jinja"
        if config.get("chat_template") is None and jinja_file.is_file():
            config = {**config, "chat_template": jinja_file.read_text(encoding="utf-8")}
        self._setup(config, model_vocab_size, "tokenizer.json and config.json")

    @classmethod
    def from_tokenizer(cls, tok: Any, config: dict[str, Any], model_vocab_size: int | None = None) -> "Tokenizer":
        """An in-memory `tokenizers.Tokenizer` plus tokenizer_config.json-style fields (bos_token, eos_token,
        add_bos_token, chat_template), e.g. built from a GGUF file's metadata."""
        self = cls.__new__(cls)
        self._tok = tok
        self._setup(config, model_vocab_size, "the tokenizer and the model")
        return self

    def _setup(self, config: dict[str, Any], model_vocab_size: int | None, sources: str) -> None:
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            raise TokenizerError(
                f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is {model_vocab_size}; "
                f"{sources} belong to different models"
            )
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.special_tokens = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name)))}
        template = config.get("chat_template")
        self.chat_templates: dict[str, str] = {}
        if isinstance(template, list):  # named templates: "default", and "tool_use" for a request with tools
            self.chat_templates = {t["name"]: t["template"] for t in template
                                   if isinstance(t, dict) and isinstance(t.get("name"), str)
                                   and isinstance(t.get("template"), str)}
            template = self.chat_templates.get("default") or next(iter(self.chat_templates.values()), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ---- encoding ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool | str = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The checkpoint's chat template rendered as transformers renders it (see shoal.chat_template); with
        tools, a checkpoint's template named "tool_use" is taken when it has one."""
        template = self.chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        if not template:
            raise TokenizerError("this checkpoint's tokenizer_config.json has no chat_template; use `shoal generate`")
        return render(template, messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message, special_tokens=self.special_tokens,
                      template_kwargs=template_kwargs)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **options: Any) -> list[int]:
        """Render the chat template (options as render_chat's) and tokenize it; the template places BOS itself."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **options), add_special_tokens=False)

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes any token's text spans: a text of B bytes needs at least B / this many tokens
        (a token's text, byte-level or SentencePiece, is never shorter in bytes than what it stands for), so
        the server refuses a prompt too long for the context before paying to tokenize it."""
        if getattr(self, "_max_token_bytes", None) is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1) or 1
        return self._max_token_bytes

    # ---- decoding ----------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces as they arrive.

    Text is only released once it no longer ends in an incomplete UTF-8 sequence (the decoder shows
    those as U+FFFD), and it is decoded in a short window so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start: context so the decoder joins words correctly
        self._read_offset = 0  # ids before this are already in self.text

    def add(self, token_id: int) -> str:
        """Append one id; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.ids[self._prefix_offset : self._read_offset])
        full = decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self.text += piece
            return piece
        return ""
