"""Deployment cases for `shoal plan --validate`: the public JSON format (a list of measured deployments),
and the older TOML form, read into one `Case` that validate.py predicts and fits on.

Every problem with a file is one PlanError line naming the file, the case and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from shoal.planner.errors import PlanError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

SHIPPED_CASES = Path(__file__).with_name("cases.json")
PHASES = ("prefill", "decode", "both")
# The measured keys each phase can predict.
MEASURED_KEYS = {
    "prefill": ("input_tok_s_per_chip", "ttft_ms"),
    "decode": ("output_tok_s_per_chip", "tpot_ms"),
    "both": ("output_tok_s_per_chip", "input_tok_s_per_chip", "tpot_ms", "ttft_ms"),
}
# How the load is given: exactly one of these per case (tpot_limit_ms: decode only, the largest batch
# whose time per output token stays within it, for sources that publish an SLO rather than a batch).
LOAD_KEYS = ("batch_per_chip", "tokens_per_chip", "concurrency", "tpot_limit_ms")
LOADS_BY_PHASE = {
    "prefill": ("batch_per_chip", "tokens_per_chip", "concurrency"),
    "decode": ("batch_per_chip", "concurrency", "tpot_limit_ms"),
    "both": ("batch_per_chip", "concurrency"),
}
REQUIRED = ("name", "source", "model", "chip", "chips", "phase", "input_len", "measured")
INTEGERS = ("chips", "tp", "ep", "pp", "dp", "redundant_experts", "input_len", "output_len", "mtp_tokens",
            "chunk_tokens")
NUMBERS = ("batch_per_chip", "tokens_per_chip", "concurrency", "tpot_limit_ms", "mtp_acceptance",
           "expert_imbalance", "cache_hit_rate", "memory_util", "kv_free_fraction")
TEXTS = ("name", "source", "model", "chip", "phase", "weights", "kv_dtype", "role", "assumptions", "measured_text",
         "kv_reads")
KV_READS = ("per_kv_head", "per_query_head")
DISAGGREGATED_KEYS = ("chips", "tp", "ep", "pp", "dp", "redundant_experts", "chip")


@dataclass
class Case:
    """One measured deployment: the setup, the load, and what was measured (`measured`: key -> value)."""

    name: str
    source: str
    model: str
    chip: str
    chips: int
    phase: str
    input_len: int
    measured: dict[str, float]
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dp: int | None = None
    redundant_experts: int = 0
    weights: str = "bf16"
    kv_dtype: str = "bf16"
    output_len: int = 0
    batch_per_chip: float | None = None
    tokens_per_chip: float | None = None
    concurrency: float | None = None
    tpot_limit_ms: float | None = None
    mtp_tokens: int = 0
    mtp_acceptance: float = 0.0
    expert_imbalance: float = 1.0
    cache_hit_rate: float = 0.0
    memory_util: float = 0.9  # share of each chip's memory the engine fills (weights, KV cache, activations)
    # or: the share of the memory left after the weights that the KV cache takes (TensorRT-LLM's
    # kv_cache_free_gpu_mem_fraction); replaces memory_util when given
    kv_free_fraction: float | None = None
    kv_reads: str = "per_kv_head"  # the decode attention kernel: see cost.Deployment.kv_reads
    chunk_tokens: int = 8192  # phase both: the scheduler's token budget per step (chunked prefill)
    # phase both, disaggregated: {"prefill": {chips, tp, ep, ..., chip?}, "decode": {...}}; `chips` is their
    # sum; the prefill instance may name another chip kind (prefill on one kind, decode on another)
    disaggregated: dict[str, dict[str, int]] | None = None
    role: str = "holdout"  # "fit": the fitted factors are fitted on it; "holdout": only predicted
    assumptions: str = ""
    measured_text: str = ""
    origin: str = field(default="", compare=False)

    @property
    def context(self) -> float:
        """Mean cached tokens a decode step attends over: the prompt plus half the output."""
        return self.input_len + self.output_len / 2

    @property
    def prefill_chip(self) -> str:
        """The chip kind of the prefill instance (another kind than `chip` in a mixed fleet)."""
        return (self.disaggregated or {}).get("prefill", {}).get("chip", self.chip)

    @property
    def primary_key(self) -> str:
        """The measured figure a case is judged by: its throughput when measured, else its latency."""
        for key in ("output_tok_s_per_chip", "input_tok_s_per_chip", "tpot_ms", "ttft_ms"):
            if key in self.measured and key in MEASURED_KEYS[self.phase][:2 if self.phase == "both" else 1]:
                return key
        return next(iter(self.measured))


def _where(origin: str, index: int, entry: dict) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{origin}: case {name!r}" if isinstance(name, str) else f"{origin}: case #{index + 1}"


def parse_case(entry: object, origin: str = "<cases>", index: int = 0) -> Case:
    """One case of the public format, checked field by field (the layout against the model is checked
    when it is predicted, where the model's shape is known)."""
    where = _where(origin, index, entry if isinstance(entry, dict) else {})
    if not isinstance(entry, dict):
        raise PlanError(f"{where}: each case must be a JSON object, got {type(entry).__name__}")
    known = set(REQUIRED) | set(INTEGERS) | set(NUMBERS) | set(TEXTS) | {"disaggregated"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise PlanError(f"{where}: unknown field {unknown[0]!r}")
    for key in REQUIRED:
        if key not in entry:
            raise PlanError(f"{where}: missing field {key!r}")
    values: dict = {}
    for key, value in entry.items():
        if key in INTEGERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
                raise PlanError(f"{where}: {key} must be a whole number >= 0, got {value!r}")
            values[key] = int(value)
        elif key in NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise PlanError(f"{where}: {key} must be a number >= 0, got {value!r}")
            values[key] = float(value)
        elif key in TEXTS:
            if not isinstance(value, str) or (key in REQUIRED and not value.strip()):
                raise PlanError(f"{where}: {key} must be a non-empty string, got {value!r}")
            values[key] = value.strip().lower() if key in ("chip", "phase", "weights", "kv_dtype", "role", "kv_reads") \
                else value
        else:
            values[key] = value
    phase = values["phase"]
    if phase not in PHASES:
        raise PlanError(f"{where}: phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if values.get("kv_reads", KV_READS[0]) not in KV_READS:
        raise PlanError(f"{where}: kv_reads must be one of {', '.join(KV_READS)}, got {values['kv_reads']!r}")
    if values.get("role", "holdout") not in ("fit", "holdout"):
        raise PlanError(f"{where}: role must be fit or holdout, got {values['role']!r}")
    for key in ("chips", "input_len", "tp", "ep", "pp", "dp"):
        if key in values and values[key] < 1:
            raise PlanError(f"{where}: {key} must be >= 1, got {values[key]}")
    if phase in ("decode", "both") and "output_len" not in values:
        raise PlanError(f"{where}: missing field 'output_len' (phase {phase} needs it)")
    if phase == "both" and values["output_len"] < 1:
        raise PlanError(f"{where}: output_len must be >= 1 for phase both")
    loads = [k for k in LOAD_KEYS if k in values]
    allowed = LOADS_BY_PHASE[phase]
    if len(loads) != 1:
        raise PlanError(f"{where}: give exactly one of {', '.join(allowed)} (got "
                        f"{', '.join(loads) if loads else 'none'})")
    if loads[0] not in allowed:
        raise PlanError(f"{where}: {loads[0]} does not apply to phase {phase}; use one of {', '.join(allowed)}")
    if values[loads[0]] <= 0:
        raise PlanError(f"{where}: {loads[0]} must be positive")
    if not 0 <= values.get("mtp_acceptance", 0.0) <= 1:
        raise PlanError(f"{where}: mtp_acceptance must be between 0 and 1")
    if values.get("mtp_acceptance") and "mtp_tokens" not in values:
        values["mtp_tokens"] = 1  # the published MTP deployments propose one draft token
    if values.get("expert_imbalance", 1.0) < 1:
        raise PlanError(f"{where}: expert_imbalance is the busiest chip's load over the mean, so >= 1")
    if not 0 < values.get("memory_util", 0.9) <= 1 or not 0 < values.get("kv_free_fraction", 0.9) <= 1:
        raise PlanError(f"{where}: memory_util and kv_free_fraction must be in (0, 1]")
    if "memory_util" in values and "kv_free_fraction" in values:
        raise PlanError(f"{where}: give memory_util or kv_free_fraction, not both")
    if not 0 <= values.get("cache_hit_rate", 0.0) < 1:
        raise PlanError(f"{where}: cache_hit_rate must be in [0, 1)")
    measured = values["measured"]
    if not isinstance(measured, dict) or not measured:
        raise PlanError(f"{where}: measured must be an object with at least one of "
                        f"{', '.join(MEASURED_KEYS[phase])}")
    for key, value in measured.items():
        if key not in MEASURED_KEYS[phase]:
            raise PlanError(f"{where}: measured {key!r} cannot be predicted for phase {phase}; "
                            f"use {', '.join(MEASURED_KEYS[phase])}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise PlanError(f"{where}: measured {key} must be a positive number, got {value!r}")
    values["measured"] = {k: float(v) for k, v in measured.items()}
    if "disaggregated" in values:
        values["disaggregated"] = _parse_disaggregated(values, where)
    elif "dp" in values:
        if values["chips"] != values.get("tp", 1) * values.get("pp", 1) * values["dp"]:
            raise PlanError(f"{where}: chips={values['chips']} is not tp x pp x dp = "
                            f"{values.get('tp', 1)} x {values.get('pp', 1)} x {values['dp']}")
    return Case(**values, origin=origin)


def _parse_disaggregated(values: dict, where: str) -> dict[str, dict[str, int]]:
    spec = values["disaggregated"]
    if values["phase"] != "both":
        raise PlanError(f"{where}: disaggregated applies to phase both only")
    if not isinstance(spec, dict) or set(spec) != {"prefill", "decode"}:
        raise PlanError(f"{where}: disaggregated must be {{\"prefill\": {{...}}, \"decode\": {{...}}}}")
    parsed = {}
    for part, layout in spec.items():
        if not isinstance(layout, dict) or "chips" not in layout:
            raise PlanError(f"{where}: disaggregated.{part} must be an object with chips (and tp, ep, pp, dp)")
        bad = sorted(set(layout) - set(DISAGGREGATED_KEYS))
        if bad:
            raise PlanError(f"{where}: disaggregated.{part}: unknown field {bad[0]!r}")
        if "chip" in layout:  # a mixed fleet: this instance on another chip kind
            if part != "prefill" or not isinstance(layout["chip"], str) or not layout["chip"].strip():
                raise PlanError(f"{where}: only disaggregated.prefill may name its own chip (a catalog key)")
            layout = {**layout, "chip": layout["chip"].strip().lower()}
        for key, value in layout.items():
            if key == "chip":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "redundant_experts" else 1):
                raise PlanError(f"{where}: disaggregated.{part}.{key} must be a whole number >= 1, got {value!r}")
        if "dp" in layout and layout["chips"] != layout.get("tp", 1) * layout.get("pp", 1) * layout["dp"]:
            raise PlanError(f"{where}: disaggregated.{part}: chips is not tp x pp x dp")
        parsed[part] = dict(layout)
    if parsed["prefill"]["chips"] + parsed["decode"]["chips"] != values["chips"]:
        raise PlanError(f"{where}: chips={values['chips']} is not the prefill and decode instances' chips together")
    return parsed


def load_cases(path: str | Path = SHIPPED_CASES) -> list[Case]:
    """The cases of a public-format JSON file, or of a TOML file of the older form ([[case]] tables)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"no cases file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read cases file {path}: {exc}") from None
    if path.suffix.lower() == ".toml":
        return _toml_cases(text, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise PlanError(f"{path}: must hold a JSON list of cases (objects), got {type(data).__name__}")
    cases = [parse_case(entry, str(path), i) for i, entry in enumerate(data)]
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise PlanError(f"{path}: case {case.name!r} appears twice; names must be unique")
        seen.add(case.name)
    return cases


def _toml_cases(text: str, origin: str) -> list[Case]:
    """The older TOML form (id, published, per_chips, prompt_len, prompts_per_chip, context, tpot_ms as
    a limit), mapped field by field onto the public one."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{origin}: not valid TOML: {exc}") from None
    entries = data.get("case")
    if not isinstance(entries, list) or not entries:
        raise PlanError(f"{origin}: has no [[case]] tables")
    cases = []
    for i, old in enumerate(entries):
        where = f"{origin}: case {old.get('id', '#' + str(i + 1))!r}"
        for key in ("id", "phase", "published", "per_chips"):
            if key not in old:
                raise PlanError(f"{where}: missing field {key!r}")
        new = {k: old[k] for k in ("source", "model", "chip", "chips", "tp", "ep", "pp", "redundant_experts",
                                   "kv_dtype", "role", "assumptions", "mtp_tokens", "mtp_acceptance",
                                   "cache_hit_rate", "batch_per_chip") if k in old}
        new.update(name=old["id"], weights=old.get("quant", "bf16"), measured_text=old.get("published_text", ""))
        per_chip = old["published"] / old["per_chips"]
        if old["phase"] == "prefill":
            new.update(input_len=old.get("prompt_len", 0), batch_per_chip=old.get("prompts_per_chip", 1),
                       measured={"input_tok_s_per_chip": per_chip})
        else:
            new.update(input_len=old.get("context", 0), output_len=0, measured={"output_tok_s_per_chip": per_chip})
            if "batch_per_chip" not in old and "tpot_ms" in old:
                new["tpot_limit_ms"] = old["tpot_ms"]
        new.setdefault("source", "")
        new["phase"] = old["phase"]
        cases.append(parse_case(new, origin, i))
    return cases
