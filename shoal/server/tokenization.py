"""vLLM's tokenizer endpoints, which evaluation harnesses use to tokenize with the server's own tokenizer:
POST /tokenize (a prompt, or a chat rendered with the checkpoint's template), POST /detokenize, and
GET /tokenizer_info (the special tokens and the chat template)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shoal.errors import TokenizerError
from shoal.server.conversation import conversation
from shoal.server.protocol import DetokenizeRequest, RequestError, TokenizeRequest


class TokenizationServing:
    def __init__(self, serving) -> None:
        self.serving = serving  # the OpenAIServing: its tokenizer, model name and bounds
        self.tokenizer = serving.tokenizer

    async def tokenize(self, request: Request) -> Response:
        from shoal.server.serving import parse

        req = await parse(TokenizeRequest, await request.body())
        self.serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give either prompt or messages", param="prompt")
        chat = None
        if req.messages is not None:
            chat = conversation(req.messages, req.tools, req.add_generation_prompt, req.continue_final_message,
                                req.chat_template_kwargs, req.documents)

        size = len(req.prompt.encode("utf-8")) if chat is None else chat.text_bytes()
        self.serving._check_prompt_bytes(size)

        def run() -> list[int]:
            if chat is None:
                return self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
            text = self.tokenizer.render_chat(chat.messages, chat.add_generation_prompt, **chat.render_options())
            return self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))

        try:
            ids = await self.serving.tokenizer_pool.run(size, run)
        except TokenizerError as exc:
            raise RequestError(str(exc), param="messages") from None
        strs = [self.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": self.serving.max_model_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        from shoal.server.serving import parse

        req = await parse(DetokenizeRequest, await request.body())
        self.serving.check_model(req.model)
        vocab = self.serving.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param="tokens")
        text = await asyncio.to_thread(self.tokenizer.decode, req.tokens)
        return JSONResponse({"prompt": text})

    def info(self) -> dict:
        tok = self.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", **tok.special_tokens, "add_bos_token": tok.add_bos_token,
                "chat_template": tok.chat_template, "model_max_length": self.serving.max_model_len,
                "vocab_size": self.serving.vocab_size}
