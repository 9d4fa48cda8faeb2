"""How logprobs leave the server: OpenAI's legacy completions shape (tokens, token_logprobs, top_logprobs,
text_offset; the echoed prompt's part with a null first), the chat shape (content entries with bytes), and
vLLM's prompt_logprobs (token id -> logprob, rank, decoded_token)."""

from __future__ import annotations

import math
from collections.abc import Callable

from shoal.outputs import TokenLogprob


def finite(value: float) -> float:
    # JSON has no -Infinity; a logprob that underflowed is reported as a very unlikely finite value.
    return value if math.isfinite(value) else -9999.0


class LogprobFormatter:
    def __init__(self, token: Callable[[int], str]) -> None:
        self.token = token  # id -> its text (cached by the serving layer)

    def echo(self, ids: list[int], logprobs: list[TokenLogprob | None] | None) -> dict:
        """The prompt's part of an echoed completion's logprobs: its tokens, each one's logprob given those before
        it and the top alternatives there (null for the first token, which nothing predicts)."""
        tokens, values, tops, offsets = [], [], [], []
        offset = 0
        for position, token_id in enumerate(ids):
            token = self.token(token_id)
            lp = logprobs[position] if logprobs is not None and position < len(logprobs) else None
            tokens.append(token)
            values.append(None if lp is None else finite(lp.logprob))
            top = None
            if lp is not None:
                top = {}
                for t, v in lp.top_logprobs.items():
                    top.setdefault(self.token(t), finite(v))
            tops.append(top)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def vllm_prompt(self, logprobs: list[TokenLogprob | None] | None, top_n: int) -> list | None:
        """vLLM's prompt_logprobs: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}},
        the prompt's own token first, then the top_n alternatives."""
        if logprobs is None:
            return None
        out: list = []
        for lp in logprobs:
            if lp is None:
                out.append(None)
                continue
            entry = {str(lp.token_id): {"logprob": finite(lp.logprob), "rank": lp.rank,
                                        "decoded_token": self.token(lp.token_id)}}
            for rank, (t, v) in enumerate(list(lp.top_logprobs.items())[:top_n], start=1):
                entry.setdefault(str(t), {"logprob": finite(v), "rank": rank, "decoded_token": self.token(t)})
            out.append(entry)
        return out

    @staticmethod
    def joined(first: dict, second: dict) -> dict:
        return {key: first[key] + second[key] for key in first}

    def completion(self, logprobs: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            token = self.token(lp.token_id)
            tokens.append(token)
            values.append(finite(lp.logprob))
            top: dict[str, float] = {}
            for t, v in lp.top_logprobs.items():  # most likely first: keep that one when two ids read the same
                top.setdefault(self.token(t), finite(v))
            tops.append(top)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset

    def chat(self, logprobs: list[TokenLogprob]) -> list[dict]:
        def entry(token_id: int, value: float) -> dict:
            token = self.token(token_id)
            return {"token": token, "logprob": finite(value), "bytes": list(token.encode("utf-8"))}

        return [{**entry(lp.token_id, lp.logprob),
                 "top_logprobs": [entry(t, v) for t, v in lp.top_logprobs.items()]} for lp in logprobs]
