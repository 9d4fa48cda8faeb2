"""AsyncEngine: drives one LLMEngine from a background thread for an asyncio server.

The server calls `add_request` on its event loop and iterates the returned stream; one thread owns
the LLMEngine (nothing else touches it), applies new requests and aborts between steps, runs
`step()`, and hands each step's deltas back to the event loop with `call_soon_threadsafe`.

A step that fails for some sequences (LLMEngine isolates them) ends only their requests, with
GenerationError. When the step loop itself raises, or a split model loses a worker, the engine is
failed: every request in flight gets an error (`answer_failure`, from any thread, even while a step is
stuck), new ones are refused, and `healthy` turns False (`shoal serve` then exits non-zero).

Admission: only sequences that will really wait for a slot count against `max_waiting` — those beyond
the free sequence slots (`max_num_seqs` minus the running ones) — so a burst into an idle engine is taken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from shoal.engine.llm_engine import LLMEngine
from shoal.engine.speculative import SpeculationStats
from shoal.engine.sequence import Sequence
from shoal.errors import EngineUnavailableError, GenerationError, InvalidRequestError, QueueFullError, ShoalError
from shoal.outputs import TokenLogprob
from shoal.sampling_params import SamplingParams

logger = logging.getLogger("shoal.engine")

DEFAULT_MAX_WAITING = 512
_IDLE_RETRY_S = 0.005  # sleep when work is queued but nothing can be scheduled, instead of spinning


@dataclass
class Delta:
    """What one step added to one completion (`index` within its request)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # set exactly once, on the completion's last delta
    num_prompt_tokens: int
    num_output_tokens: int  # so far, including token_ids
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a completion's first delta, when asked for
    embedding: list[float] | None = None  # likewise, with SamplingParams.pooling


@dataclass
class SequenceTiming:
    """Handed to the `on_finished` observer (in the engine thread) when a completion ends normally."""

    time_to_first_token: float
    time_per_output_token: float | None  # None with a single output token
    latency: float
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    num_blocks: int = 0
    used_blocks: int = 0
    free_blocks: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    speculation: SpeculationStats | None = None  # draft counters (a copy) under speculative decoding
    expert_load: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens routed per expert
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    requests_aborted: int = 0
    requests_rejected: int = 0
    healthy: bool = True


class RequestStream:
    """Async iterator of a request's Deltas (all its completions interleaved); ends when all finished.

    An engine failure or shutdown is raised from the iteration as EngineUnavailableError.
    """

    def __init__(self, request_id: str, num_completions: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._remaining = num_completions
        self.finished = False

    def _put(self, item: Delta | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self._remaining -= 1
            if self._remaining == 0:
                self.finished = True
        return item


@dataclass
class _Pending:
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival: float


@dataclass
class _Tracked:
    stream: RequestStream
    index: int
    arrival: float
    first_token: float | None = None
    sent_tokens: int = 0
    sent_logprobs: int = 0


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int = DEFAULT_MAX_WAITING,
        on_finished: Callable[[SequenceTiming], None] | None = None,
    ) -> None:
        if max_waiting < 1:
            raise InvalidRequestError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._on_finished = on_finished
        self._cond = threading.Condition()
        # Guarded by _cond: the engine thread's inbox and what it publishes.
        self._inbox: deque[_Pending] = deque()
        self._aborts: set[str] = set()
        self._abort_all_reason: str | None = None
        self._streams: dict[str, RequestStream] = {}  # request id -> stream, from add until done
        self._stopping = False
        self._closed_reason: str | None = None  # set once: no new requests from then on
        self._failed: BaseException | None = None
        self._stats = EngineStats()
        self._waiting_in_engine = 0  # the scheduler's waiting queue, as of the last published stats
        self._admitting = 0  # taken from the inbox but not yet counted in _waiting_in_engine
        self._running = 0  # the scheduler's running sequences, as of the last published stats
        # Engine thread only.
        self._tracked: dict[str, _Tracked] = {}  # sequence id -> its stream state
        self._seq_ids: dict[str, list[str]] = {}  # request id -> its sequence ids
        self._thread: threading.Thread | None = None
        self._publish_stats()

    # ---- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shoal-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the step loop; requests still in flight get EngineUnavailableError. Idempotent."""
        with self._cond:
            self._stopping = True
            self._closed_reason = self._closed_reason or "the server is shutting down"
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            # A failed engine's thread may be stuck in a collective until it times out: do not wait for it.
            self._thread.join(timeout if self.healthy else min(timeout, 1.0))

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and end every request in flight with EngineUnavailableError(reason)."""
        with self._cond:
            self._closed_reason = self._closed_reason or reason
            self._abort_all_reason = reason
            self._cond.notify_all()

    def answer_failure(self) -> None:
        """The engine cannot continue: end every request in flight with EngineUnavailableError and refuse new
        ones. Safe from any thread — the engine thread may be stuck in a step of a split model whose worker is
        gone (until the collective timeout), and its clients must be answered before the process exits."""
        with self._cond:
            message = self.failed_message()
            self._closed_reason = message
            streams = list(self._streams.values())
            self._streams.clear()
            self._inbox.clear()
            self._cond.notify_all()
        self._deliver([(s, EngineUnavailableError(message)) for s in streams])

    @property
    def closed_reason(self) -> str | None:
        """Why new requests are refused (shutting down, failed), or None while they are taken."""
        return self._closed_reason

    @property
    def healthy(self) -> bool:
        thread_ok = self._thread is None or self._thread.is_alive() or self._stopping
        return self._failed is None and thread_ok and self.engine.failure() is None

    @property
    def failure_reason(self) -> str | None:
        """Why the engine failed when that is safe to tell a client (a split model names the worker rank
        that stopped), or None; an internal error's text stays in the log."""
        return self.engine.failure()

    def failed_message(self) -> str:
        reason = self.failure_reason
        return f"the engine failed ({reason}); restart the server" if reason else "the engine failed; restart the server"

    # ---- requests (add_request on the event loop; abort and stats from any thread) -----------
    def add_request(
        self,
        request_id: str,
        items: Seq[tuple[list[int], SamplingParams]],
        prompt: str | None = None,
    ) -> RequestStream:
        """Queue the completions of one request (each a prompt and its params); stream their deltas
        to the running event loop, the one this is called on.

        Prompts must already have passed `LLMEngine.check_prompt` (the caller does that off the event
        loop). Raises QueueFullError when too many are waiting, EngineUnavailableError when failed or
        shutting down, InvalidRequestError when a prompt cannot fit in the KV cache at all.
        """
        if not items:
            raise InvalidRequestError("a request needs at least one completion")
        blocks = self.engine.block_manager
        for ids, _ in items:
            needed = -(-(len(ids) + 1) // blocks.block_size)
            if needed > blocks.num_blocks:
                raise InvalidRequestError(
                    f"the prompt needs {needed} KV blocks but the cache has only {blocks.num_blocks}; shorten it"
                )
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, len(items), loop)
        now = time.monotonic()
        with self._cond:
            if self._failed is not None or self.engine.failure() is not None:
                raise EngineUnavailableError(self.failed_message())
            if self._closed_reason is not None:
                raise EngineUnavailableError(self._closed_reason)
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            queued = self._waiting_in_engine + self._admitting + len(self._inbox)
            free_slots = max(0, self.engine.scheduler.max_num_seqs - self._running)
            waiting = max(0, queued - free_slots)  # those that wait for a slot now
            # An empty queue always takes one request, however many completions it asks for.
            if waiting and max(0, queued + len(items) - free_slots) > self.max_waiting:
                self._stats.requests_rejected += 1
                raise QueueFullError(
                    f"the server is at capacity ({waiting} sequences waiting, at most {self.max_waiting}); retry later"
                )
            self._streams[request_id] = stream
            for index, (ids, params) in enumerate(items):
                self._inbox.append(_Pending(request_id, index, list(ids), params, prompt, now))
            self._cond.notify_all()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away) and free its KV blocks; thread-safe, idempotent."""
        with self._cond:
            if request_id in self._streams:
                self._aborts.add(request_id)
                self._cond.notify_all()

    def stats(self) -> EngineStats:
        with self._cond:
            s = self._stats
            return EngineStats(**{**s.__dict__, "requests_finished": dict(s.requests_finished),
                                  "expert_load": {k: list(v) for k, v in s.expert_load.items()},
                                  "waiting": s.waiting + self._admitting + len(self._inbox),
                                  "healthy": self.healthy})

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # any failure must reach every waiting client
            logger.exception("the engine step loop failed; every request in flight gets an error")
            with self._cond:
                self._failed = exc
            self.answer_failure()
            self._publish_stats()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stopping or self._inbox or self._aborts or self._abort_all_reason
                           or engine.has_unfinished()):
                    self._cond.wait()
                stopping = self._stopping
                abort_all = self._abort_all_reason or ("the server is shutting down" if stopping else None)
                self._abort_all_reason = None
                aborts, self._aborts = self._aborts, set()
                if abort_all is not None:
                    dropped = list(self._streams.values())
                    aborts |= set(self._streams)
                    self._streams.clear()
                else:
                    dropped = []
                    for rid in aborts:
                        self._streams.pop(rid, None)
                queued = {p.request_id for p in self._inbox if p.request_id in aborts}
                new = [p for p in self._inbox if p.request_id not in aborts]
                self._inbox = deque()
                self._admitting = len(new)
            self._apply_aborts(aborts, queued)
            if dropped:
                self._deliver([(s, EngineUnavailableError(abort_all)) for s in dropped])
            if stopping:
                self._publish_stats()
                return
            outgoing: list[tuple[RequestStream, Delta | BaseException]] = []
            for pending in new:
                self._admit(pending, outgoing)
            if engine.has_unfinished():
                advanced = engine.step()
                now = time.monotonic()
                for seq in advanced:
                    self._collect(seq, now, outgoing)
            self._publish_stats()
            self._deliver(outgoing)
            if engine.has_unfinished() and not engine.scheduler.running:
                with self._cond:  # queued work that cannot be scheduled yet: do not spin
                    self._cond.wait(_IDLE_RETRY_S)

    def _apply_aborts(self, request_ids: set[str], queued: set[str]) -> None:
        """Free the blocks of aborted requests; `queued` ones never reached the engine."""
        for rid in request_ids:
            unfinished = rid in queued
            for sid in self._seq_ids.pop(rid, []):
                if self._tracked.pop(sid, None) is not None:
                    unfinished = True
                self.engine.abort(sid)
            if unfinished:
                with self._cond:
                    self._stats.requests_aborted += 1

    def _admit(self, pending: _Pending, outgoing: list) -> None:
        with self._cond:
            stream = self._streams.get(pending.request_id)
        if stream is None:  # aborted while queued
            return
        sid = f"{pending.request_id}-{pending.index}"
        try:
            self.engine.add_request(pending.prompt_ids, pending.params, pending.prompt, request_id=sid)
        except ShoalError as exc:
            # add_request already checked everything it could; this is a request the engine still refuses.
            with self._cond:
                self._streams.pop(pending.request_id, None)
            for other in self._seq_ids.pop(pending.request_id, []):
                self._tracked.pop(other, None)
                self.engine.abort(other)
            outgoing.append((stream, exc))
            return
        self._seq_ids.setdefault(pending.request_id, []).append(sid)
        self._tracked[sid] = _Tracked(stream, pending.index, pending.arrival)
        with self._cond:
            self._stats.prompt_tokens += len(pending.prompt_ids)

    def _collect(self, seq: Sequence, now: float, outgoing: list) -> None:
        tracked = self._tracked.get(seq.request_id)
        if tracked is None:
            return
        if seq.error is not None:
            self._fail_request(tracked, seq, outgoing)
            return
        prompt_logprobs = embedding = None
        if tracked.first_token is None:
            tracked.first_token = now
            prompt_logprobs, embedding = seq.prompt_logprobs, seq.embedding
        new_ids = seq.output_ids[tracked.sent_tokens :]
        tracked.sent_tokens = len(seq.output_ids)
        logprobs = None
        if seq.logprobs is not None:
            logprobs = seq.logprobs[tracked.sent_logprobs :]
            tracked.sent_logprobs = len(seq.logprobs)
        finish = seq.finish_reason if seq.is_finished else None
        delta = Delta(tracked.index, new_ids, seq.take_new_text(), logprobs, finish,
                      len(seq.prompt_ids), len(seq.output_ids), prompt_logprobs, embedding)
        outgoing.append((tracked.stream, delta))
        with self._cond:
            self._stats.generation_tokens += len(new_ids)
            if finish is not None:
                self._stats.requests_finished[finish] = self._stats.requests_finished.get(finish, 0) + 1
        if finish is not None:
            del self._tracked[seq.request_id]
            rid = tracked.stream.request_id
            siblings = self._seq_ids.get(rid, [])
            if seq.request_id in siblings:
                siblings.remove(seq.request_id)
            if not siblings:
                self._seq_ids.pop(rid, None)
                with self._cond:
                    self._streams.pop(rid, None)
            if self._on_finished is not None:
                n = len(seq.output_ids)
                timing = SequenceTiming(
                    time_to_first_token=tracked.first_token - tracked.arrival,
                    time_per_output_token=(now - tracked.first_token) / (n - 1) if n > 1 else None,
                    latency=now - tracked.arrival,
                    num_prompt_tokens=len(seq.prompt_ids),
                    num_output_tokens=n,
                    finish_reason=finish,
                )
                try:
                    self._on_finished(timing)
                except Exception:  # metrics must never take the engine down
                    logger.exception("the on_finished observer failed")

    def _fail_request(self, tracked: _Tracked, seq: Sequence, outgoing: list) -> None:
        """One sequence's step failed: its whole request ends with that error (its other completions aborted)."""
        rid = tracked.stream.request_id
        for sid in self._seq_ids.pop(rid, []):
            self._tracked.pop(sid, None)
            if sid != seq.request_id:
                self.engine.abort(sid)
        with self._cond:
            self._streams.pop(rid, None)
            self._stats.requests_finished["error"] = self._stats.requests_finished.get("error", 0) + 1
        outgoing.append((tracked.stream, GenerationError(seq.error)))

    def _publish_stats(self) -> None:
        engine = self.engine
        blocks = engine.block_manager
        with self._cond:
            s = self._stats
            s.running = self._running = len(engine.scheduler.running)
            s.waiting = self._waiting_in_engine = len(engine.scheduler.waiting)
            self._admitting = 0
            s.num_blocks, s.free_blocks = blocks.num_blocks, blocks.num_free_blocks
            s.used_blocks = s.num_blocks - s.free_blocks
            s.prefix_queries, s.prefix_hits = blocks.prefix_queries, blocks.prefix_hits
            s.preemptions = engine.scheduler.num_preemptions
            if engine.draft is not None:
                s.speculation = dataclasses.replace(engine.speculation, accepted_at=list(engine.speculation.accepted_at))
        # Refreshed at most once a second while busy, and once more when the engine goes idle.
        load = engine.expert_load(0.0 if not engine.has_unfinished() else 1.0) if engine.failure() is None else None
        if load is not None:
            with self._cond:
                self._stats.expert_load = load

    @staticmethod
    def _deliver(items: list[tuple[RequestStream, Delta | BaseException]]) -> None:
        """One call_soon_threadsafe per event loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _put_all(batch: list[tuple[RequestStream, Delta | BaseException]]) -> None:
    for stream, item in batch:
        stream._put(item)
