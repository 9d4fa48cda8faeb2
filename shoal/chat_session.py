"""`shoal chat`'s conversation: turns through the checkpoint's chat template, the commands a person types
(/exit, /reset, /system TEXT, /help), and Ctrl-C that stops the reply being written, not the chat."""

from __future__ import annotations

from collections.abc import Callable

from shoal.sampling_params import SamplingParams

HELP = ("/exit (or an empty line, or Ctrl-D) ends the chat; /reset forgets the conversation; /system TEXT sets "
        "the system message (/system alone clears it); Ctrl-C stops a reply")
STOPPED = " [stopped]"


class ChatSession:
    def __init__(self, llm, params: SamplingParams, system: str | None = None) -> None:
        self.llm, self.params = llm, params
        self.system = system
        self.turns: list[dict[str, str]] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> str | None:
        """A /command -> what to tell the person ("" for /exit); None when the line is a message for the model."""
        if not line.startswith("/"):
            return None
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return ""
        if name == "/reset":
            self.turns.clear()
            return "(conversation forgotten" + ("; the system message stays)" if self.system else ")")
        if name == "/system":
            self.system = rest.strip() or None
            return f"(system message: {self.system})" if self.system else "(no system message)"
        if name == "/help":
            return HELP
        return f"(unknown command {name}; {HELP})"

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Send a user turn, write the reply as it streams, and keep both in the conversation. Ctrl-C
        (KeyboardInterrupt) stops the reply: what was written so far is kept as the assistant's turn."""
        self.turns.append({"role": "user", "content": text})
        run = self.llm.generation(self.llm.chat_prompt_ids(self.messages), self.params)
        pieces: list[str] = []
        try:
            for piece in run:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            run.close()  # aborts the request: its KV blocks are freed
            write(STOPPED)
        self.turns.append({"role": "assistant", "content": "".join(pieces).strip()})
        return "".join(pieces)
