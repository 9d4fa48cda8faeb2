"""Prometheus metrics for GET /metrics, in the text exposition format (version 0.0.4), written here.

Gauges and counters come from the AsyncEngine's stats snapshot; latency histograms are fed by the
engine thread (`observe`) each time a completion ends, and the step histograms (`observe_step`, the
LLMEngine's `on_step`) after each engine step: how long decode steps take and how many sequences each
step runs, so a served step can be set beside an offline one at the same batch.
"""

from __future__ import annotations

import math
import threading

from shoal.engine.async_engine import EngineStats, SequenceTiming
from shoal.engine.llm_engine import StepRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
STEP_SEQUENCE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Histogram:
    """Cumulative buckets, sum and count; observed from the engine thread, rendered from the server's."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.bounds = name, help, tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def render(self, labels: str) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.bounds + (math.inf,), counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum{{{labels}}} {_number(total)}")
        lines.append(f"{self.name}_count{{{labels}}} {cumulative}")
        return lines


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{_escape(model_name)}"'
        self.ttft = Histogram("shoal_time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.tpot = Histogram(
            "shoal_time_per_output_token_seconds", "Mean time between output tokens of a completion.", TPOT_BUCKETS
        )
        self.latency = Histogram(
            "shoal_e2e_request_latency_seconds", "Time from arrival to the last token of a completion.", LATENCY_BUCKETS
        )
        self.decode_step = Histogram(
            "shoal_decode_step_seconds", "Engine steps of one new token per sequence (no prompt chunk): time each took.",
            STEP_BUCKETS,
        )
        self.prefill_step = Histogram(
            "shoal_prefill_step_seconds", "Engine steps that ran a prompt chunk (alone or with decodes): time each took.",
            STEP_BUCKETS,
        )
        self.decode_step_sequences = Histogram(
            "shoal_decode_step_sequences", "Sequences that each decode step ran (its batch).", STEP_SEQUENCE_BUCKETS
        )

    def observe(self, timing: SequenceTiming) -> None:
        self.ttft.observe(timing.time_to_first_token)
        if timing.time_per_output_token is not None:
            self.tpot.observe(timing.time_per_output_token)
        self.latency.observe(timing.latency)

    def observe_step(self, step: StepRecord) -> None:
        if step.decode:
            self.decode_step.observe(step.seconds)
            self.decode_step_sequences.observe(step.num_seqs)
        else:
            self.prefill_step.observe(step.seconds)

    def render(self, stats: EngineStats) -> str:
        labels = self.labels
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float, extra: str = "") -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.append(f"{name}{{{labels}{extra}}} {_number(value)}")

        hit_rate = stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0
        metric("shoal_num_requests_running", "gauge", "Sequences being generated now.", stats.running)
        metric("shoal_num_requests_waiting", "gauge", "Sequences waiting for a slot (new or preempted).", stats.waiting)
        metric("shoal_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", stats.num_blocks)
        metric("shoal_kv_cache_blocks_used", "gauge", "KV-cache blocks held by sequences.", stats.used_blocks)
        metric("shoal_kv_cache_blocks_free", "gauge", "KV-cache blocks free (prefix-cached ones included).",
               stats.free_blocks)
        metric("shoal_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
               stats.used_blocks / stats.num_blocks if stats.num_blocks else 0.0)
        metric("shoal_prefix_cache_queries_total", "counter", "Prompt blocks looked up in the prefix cache.",
               stats.prefix_queries)
        metric("shoal_prefix_cache_hits_total", "counter", "Prompt blocks found in the prefix cache.", stats.prefix_hits)
        metric("shoal_prefix_cache_hit_rate", "gauge", "Prefix-cache hits over queries since start.", hit_rate)
        metric("shoal_num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
               stats.preemptions)
        spec = stats.speculation
        if spec is not None:  # vLLM's spec_decode counters, and the two figures derived from them
            metric("shoal_spec_decode_num_drafts_total", "counter", "Verification steps of a sequence with a draft.",
                   spec.num_drafts)
            metric("shoal_spec_decode_num_draft_tokens_total", "counter", "Draft tokens proposed.",
                   spec.num_draft_tokens)
            metric("shoal_spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.",
                   spec.num_accepted_tokens)
            metric("shoal_spec_decode_acceptance_rate", "gauge", "Accepted over proposed draft tokens since start.",
                   spec.acceptance_rate)
            metric("shoal_spec_decode_mean_accepted_length", "gauge",
                   "Tokens emitted per verification (accepted drafts + 1) since start.", spec.mean_accepted_length)
            name = "shoal_spec_decode_num_accepted_tokens_per_pos_total"
            lines.extend([f"# HELP {name} Drafts whose token at each position was accepted.", f"# TYPE {name} counter"])
            lines.extend(f'{name}{{{labels},position="{j}"}} {n}' for j, n in enumerate(spec.accepted_at))
        metric("shoal_prompt_tokens_total", "counter", "Prompt tokens admitted.", stats.prompt_tokens)
        metric("shoal_generation_tokens_total", "counter", "Tokens generated.", stats.generation_tokens)
        name = "shoal_request_success_total"
        lines.extend([f"# HELP {name} Completions that finished, by finish reason.", f"# TYPE {name} counter"])
        for reason in sorted({"stop", "length", *stats.requests_finished}):
            lines.append(f'{name}{{{labels},finished_reason="{_escape(reason)}"}} '
                         f"{stats.requests_finished.get(reason, 0)}")
        metric("shoal_requests_aborted_total", "counter", "Requests ended before finishing (client gone, or shutdown).",
               stats.requests_aborted)
        metric("shoal_requests_rejected_total", "counter", "Requests refused because the waiting queue was full.",
               stats.requests_rejected)
        metric("shoal_engine_healthy", "gauge", "1 while the engine runs, 0 once it has failed.", int(stats.healthy))
        if stats.expert_load:
            name = "shoal_expert_tokens_total"
            lines.extend([f"# HELP {name} Tokens routed to each routed expert of each MoE layer since start.",
                          f"# TYPE {name} counter"])
            for layer, counts in sorted(stats.expert_load.items()):
                lines.extend(f'{name}{{{labels},layer="{layer}",expert="{e}"}} {c}' for e, c in enumerate(counts))
            name = "shoal_expert_load_imbalance"
            lines.extend([f"# HELP {name} Busiest expert's tokens over the mean, per MoE layer (1 = balanced).",
                          f"# TYPE {name} gauge"])
            for layer, counts in sorted(stats.expert_load.items()):
                mean = sum(counts) / len(counts)
                lines.append(f'{name}{{{labels},layer="{layer}"}} {_number(max(counts) / mean if mean else 0.0)}')
        for histogram in (self.ttft, self.tpot, self.latency, self.decode_step, self.prefill_step,
                          self.decode_step_sequences):
            lines.extend(histogram.render(labels))
        return "\n".join(lines) + "\n"
