"""`shoal plan --calibrate`: run shoal's own engine on this machine over a few shapes, fit this
machine's efficiency factors, and check them on a shape held back from the fit.

The engine runs in the dtype it computes in here (`--dtype auto`: bf16 where the chip has bf16
arithmetic, float32 on a CPU without it, where bf16 is emulated and many times slower), and the
factors are ratios to the matmul peak measured in that same dtype.

The same code calibrates any device the engine runs on (`--device cuda`, `--device npu`): the
chip's peaks come from `shoal doctor`'s measurement, the factors from timing the engine.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from shoal.planner.catalog import DTYPE_FORMATS, Chip, native_format, this_machine
from shoal.planner.cost import Deployment, Factors, Layout, decode_step_time, prefill_time
from shoal.planner.errors import PlanError
from shoal.planner.shapes import ModelShape, load_shape
from shoal.planner.fitting import golden_section_min
from shoal.planner.serving import colocated

# Interleaved rounds of trials (one prefill and one decode trial of every shape per round).
ROUNDS, MIN_ROUNDS, BUDGET_S = 20, 3, 20.0
SERVING_TRIALS = 2
# Torch threads while calibrating a CPU. On a machine other work shares, a team of threads waits at
# every op for whichever thread lost its core (2 threads on a shared 2-core box: 10x slower steps);
# one thread only ever loses its share of the time.
CPU_THREADS = 1
FIT = ("prefill_compute", "decode_compute", "memory", "activation_passes", "layer_overhead_us", "step_overhead_us",
       "prefill_expert_us", "decode_expert_us")
BOUNDS = {"prefill_compute": (0.01, 1.0), "decode_compute": (0.01, 1.0), "memory": (0.01, 1.0),
          "activation_passes": (0.0, 200.0), "layer_overhead_us": (0.0, 100000.0), "step_overhead_us": (0.0, 2000000.0),
          "prefill_expert_us": (0.0, 100000.0), "decode_expert_us": (0.0, 100000.0)}


@dataclass
class Run:
    """One measured shape: `prompts` prompts of `prompt_len` tokens prefilled, then `batch` sequences
    decoded for `decode_tokens` steps."""

    name: str
    model: str  # a path or "llama:hidden,layers,heads,kv_heads,intermediate"
    prompts: int
    prompt_len: int
    batch: int
    decode_tokens: int
    held_back: bool = False
    # Serving check (held-back shapes): `serving` requests kept in flight at once, each prefilling
    # prompt_len tokens and generating serving_tokens, until twice as many have finished; 0: none.
    serving: int = 0
    serving_tokens: int = 24


RUNS = [
    Run("demo MLA+MoE (256 hidden, 4 layers)", "demo", prompts=8, prompt_len=128, batch=8, decode_tokens=16),
    Run("llama 512x4", "llama:512,4,8,4,1408", prompts=8, prompt_len=128, batch=8, decode_tokens=16),
    Run("llama 1024x4", "llama:1024,4,16,4,2816", prompts=4, prompt_len=256, batch=16, decode_tokens=16),
    Run("llama 768x6 (held back)", "llama:768,6,12,4,2048", prompts=8, prompt_len=192, batch=12, decode_tokens=16,
        held_back=True, serving=32),
]


def default_calibration_path() -> Path:
    return Path.home() / ".cache" / "shoal" / "plan_calibration.json"


def load_calibration(path: str | Path | None) -> dict | None:
    path = Path(path) if path else default_calibration_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read calibration {path}: {exc}") from None


def build_llama(spec: str, folder: Path) -> Path:
    """A random-weight Llama checkpoint (bf16) of the given shape, with the demo model's tokenizer."""
    import torch
    import transformers

    from shoal.config import DEMO_MODEL_PATH

    hidden, layers, heads, kv_heads, inter = (int(x) for x in spec.split(":", 1)[1].split(","))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=1024,
                                      bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEMO_MODEL_PATH / name).is_file():
            shutil.copy(DEMO_MODEL_PATH / name, folder / name)
    return folder


class EngineProbe:
    """One shape's engine, kept open so that trials of different shapes can take turns (interleaved, a
    burst of load from other processes slows all shapes alike instead of whichever was being timed)."""

    def __init__(self, path: str, run: Run, device: str | None, fmt: str = "bf16") -> None:
        import random

        from shoal.llm import LLM

        self.run = run
        self.chunk_tokens = max(2048, run.prompts * run.prompt_len, run.batch * run.prompt_len)
        dtype = next(name for name, f in DTYPE_FORMATS.items() if f == fmt)
        self.llm = LLM(path, device=device, dtype=dtype, progress=False, enable_prefix_caching=False,
                       max_num_seqs=max(run.batch, run.prompts, run.serving),
                       max_model_len=run.prompt_len + max(run.decode_tokens, run.serving_tokens) + 8,
                       max_num_batched_tokens=self.chunk_tokens)
        self.rng = random.Random(0)
        self.vocab = self.llm.model_config.vocab_size

    def _add(self, n: int, tokens: int) -> None:
        from shoal.sampling_params import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        for _ in range(n):
            self.llm.engine.add_request([self.rng.randrange(3, self.vocab) for _ in range(self.run.prompt_len)],
                                        params)

    def prefill_trial(self) -> float:
        """Seconds to prefill the run's prompts (one engine step; each prompt then stops at its first token)."""
        engine, sync = self.llm.engine, self.llm.backend.synchronize
        self._add(self.run.prompts, 1)
        sync()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        sync()
        return time.perf_counter() - start

    def decode_trial(self, tokens: int | None = None) -> float:
        """Median seconds of one decode step of the run's batch (each step timed on its own, the prefill
        and the first decode step left out; the median ignores a stall of a few steps)."""
        engine, sync = self.llm.engine, self.llm.backend.synchronize
        self._add(self.run.batch, (tokens or self.run.decode_tokens) + 1)
        engine.step()  # the prefill
        engine.step()  # the first decode step
        steps = []
        while engine.has_unfinished():
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            steps.append(time.perf_counter() - start)
        return statistics.median(steps) if steps else 0.0

    def serving_trial(self) -> float:
        """Output tokens/s of a closed loop: run.serving requests in flight, each finished one replaced
        at once by a new one, until 2 x run.serving have finished (prefill chunks ride in decode steps
        within the engine's token budget, as serving.colocated models it)."""
        engine, sync = self.llm.engine, self.llm.backend.synchronize
        total, tokens = 2 * self.run.serving, 0
        self._add(self.run.serving, self.run.serving_tokens)
        started = self.run.serving
        sync()
        start = time.perf_counter()
        while engine.has_unfinished():
            for seq in engine.step():
                tokens += 1
                if seq.is_finished and started < total:
                    self._add(1, self.run.serving_tokens)
                    started += 1
        sync()
        return tokens / (time.perf_counter() - start)


def measure_interleaved(probes: list[EngineProbe], rounds: int = ROUNDS, budget_s: float = BUDGET_S,
                        progress: bool = False) -> list[dict]:
    """Trials of every shape in turn, round after round; each shape's figure is its best trial.

    Other work on the machine only ever slows a trial down, so the best of several is the engine's own
    speed; taking turns means a burst of load costs every shape a trial, not one shape all of them.
    Stops after `rounds` rounds, or after MIN_ROUNDS once `budget_s` seconds of trials have passed."""
    from tqdm import tqdm

    # Warm up on the very shapes measured: a CPU matmul library prepares its kernels per shape, and the
    # first prefill of a new shape can take several times as long as the next.
    for probe in probes:
        probe.prefill_trial()
        probe.decode_trial(tokens=3)
    trials = [{"prefill_s": [], "decode_step_s": []} for _ in probes]
    start = time.perf_counter()
    for r in tqdm(range(rounds), desc="calibrate: rounds", disable=not progress):
        for probe, got in zip(probes, trials):
            got["prefill_s"].append(probe.prefill_trial())
        for probe, got in zip(probes, trials):
            got["decode_step_s"].append(probe.decode_trial())
        if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
    results = [{"prefill_s": min(t["prefill_s"]), "decode_step_s": min(t["decode_step_s"]), "trials": t}
               for t in trials]
    for probe, got in zip(probes, results):
        if getattr(getattr(probe, "run", None), "serving", 0):  # a few trials only (each is many steps); the best
            got["trials"]["serving_tps"] = [probe.serving_trial() for _ in range(SERVING_TRIALS)]
            got["serving_tps"] = max(got["trials"]["serving_tps"])
            got["chunk_tokens"] = probe.chunk_tokens
    return results


def measure_engine(path: str, run: Run, device: str | None) -> dict:
    """Time shoal's engine on one shape alone (in the device's own dtype): its best prefill and decode trials."""
    return measure_interleaved([EngineProbe(path, run, device, native_format(device))])[0]


def one_device(chip: Chip, fmt: str = "bf16") -> Deployment:
    """The engine as calibration runs it: one device, weights and KV cache in `fmt`, nothing to overlap."""
    return Deployment(chip, Layout(1), quant=fmt, kv_dtype=fmt, overlap=False)


def predict_run(shape: ModelShape, chip: Chip, factors: Factors, run: Run, fmt: str = "bf16") -> dict:
    dep = one_device(chip, fmt)
    prefill = prefill_time(shape, dep, factors, run.prompts, run.prompt_len)[0]
    context = run.prompt_len + run.decode_tokens / 2
    step = decode_step_time(shape, dep, factors, run.batch, context)[0]
    return {"prefill_s": prefill, "decode_step_s": step}


def fit(chip: Chip, data: list[tuple[ModelShape, Run, dict]], rounds: int = 12, fmt: str = "bf16") -> Factors:
    """Factors minimising squared log error of prefill time and decode step time over `data`."""
    factors = Factors(memory=0.8, overlap=0.0)

    def loss(trial: Factors) -> float:
        total = 0.0
        for shape, run, measured in data:
            got = predict_run(shape, chip, trial, run, fmt)
            total += sum(math.log(got[k] / measured[k]) ** 2 for k in ("prefill_s", "decode_step_s"))
        return total

    for _ in range(rounds):
        for name in FIT:
            value = golden_section_min(lambda v, name=name: loss(factors.replaced(**{name: v})), *BOUNDS[name])
            factors = factors.replaced(**{name: value})
    return factors


def calibrate(device: str | None = "cpu", path: str | Path | None = None, progress: bool = True,
              runs: list[Run] | None = None, measure: Callable[[str, Run, str | None], dict] | None = None,
              chip: Chip | None = None, threads: int | None = None) -> dict:
    """Measure each run, fit on those not held back, predict all; save the factors to `path`.

    On a CPU the peaks and the engine are measured with `threads` torch threads (default
    CPU_THREADS) and the thread count is restored afterwards; the factors are ratios to peaks measured
    the same way, so they carry over to other thread counts."""
    import torch

    threads = threads or (CPU_THREADS if _is_cpu(device) else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _calibrate(device, path, progress, runs, measure, chip)
    finally:
        torch.set_num_threads(before)


def _is_cpu(device: str | None) -> bool:
    return device is None or str(device).split(":")[0] == "cpu"


def _calibrate(device, path, progress, runs, measure, chip) -> dict:
    from tqdm import tqdm

    from shoal.config import DEMO_MODEL_PATH

    runs = runs or RUNS
    # an injected chip (tests) is one the cost model measures in bf16; a real device in its own dtype
    fmt = "bf16" if chip is not None else native_format(device)
    chip = chip or this_machine(quick=False, device=device)
    data = []
    with tempfile.TemporaryDirectory(prefix="shoal-calibrate-") as tmp:
        folders = []
        for i, run in enumerate(runs):
            if run.model == "demo":
                folders.append(str(DEMO_MODEL_PATH))
            elif run.model.startswith("llama:"):
                folders.append(str(build_llama(run.model, Path(tmp) / f"run{i}")))
            else:
                folders.append(run.model)
        if measure is not None:  # one shape at a time (tests inject the cost model here)
            measured = [measure(folder, run, device) for folder, run in
                        zip(folders, tqdm(runs, desc="calibrate", disable=not progress))]
        else:
            probes = [EngineProbe(folder, run, device, fmt) for folder, run in
                      zip(folders, tqdm(runs, desc="calibrate: loading", disable=not progress))]
            measured = measure_interleaved(probes, progress=progress)
        data = [(load_shape(folder), run, m) for folder, run, m in zip(folders, runs, measured)]
    train = [d for d in data if not d[1].held_back]
    if not train:
        raise PlanError("calibration needs at least one shape that is not held back")
    factors = fit(chip, train, fmt=fmt)
    rows = []
    for shape, run, measured in data:
        got = predict_run(shape, chip, factors, run, fmt)
        for key, label, tokens in (("prefill_s", "prefill tok/s", run.prompts * run.prompt_len),
                                   ("decode_step_s", "decode tok/s", run.batch)):
            rows.append({"run": run.name, "held_back": run.held_back, "metric": label,
                         "measured": tokens / measured[key], "predicted": tokens / got[key],
                         "error": measured[key] / got[key] - 1})
        if run.serving and "serving_tps" in measured:
            served = colocated(shape, one_device(chip, fmt), factors, run.serving, run.prompt_len, run.serving_tokens,
                               chunk_tokens=measured.get("chunk_tokens", 2048))
            rows.append({"run": run.name, "held_back": run.held_back, "metric": f"serving {run.serving} tok/s",
                         "measured": measured["serving_tps"], "predicted": served.output_tps,
                         "error": served.output_tps / measured["serving_tps"] - 1})
    report = {
        "chip": {"name": chip.name, "bf16_tflops": chip.bf16_tflops, "memory_bw_gbps": chip.memory_bw_gbps},
        "dtype": fmt,
        "factors": {k: v for k, v in asdict(factors).items() if k in FIT},
        "fitted_on": [r.name for r in runs if not r.held_back],
        "held_back": [r.name for r in runs if r.held_back],
        "rows": rows,
        "threads": _threads(),
        "rounds": max((len(m["trials"]["prefill_s"]) for _, _, m in data if "trials" in m), default=None),
        "trials": {run.name: m["trials"] for _, run, m in data if "trials" in m},
    }
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        report["saved_to"] = str(path)
    return report


def _threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover
        return None


def format_calibration(report: dict) -> str:
    chip = report["chip"]
    lines = [f"{chip['name']}: measured peak {chip['bf16_tflops']:.3f} TFLOP/s {report.get('dtype', 'bf16')} matmul, "
             f"{chip['memory_bw_gbps']:.1f} GB/s memory",
             f"measured with {report.get('threads')} torch thread(s); each figure the best of "
             f"{report.get('rounds')} interleaved trials",
             "fitted factors (on " + "; ".join(report["fitted_on"]) + "):"]
    lines += [f"  {k:<18} {v:.4g}" for k, v in report["factors"].items()]
    rows = [["shape", "metric", "measured", "predicted", "error"]]
    for r in report["rows"]:
        rows.append([r["run"] + (" *" if r["held_back"] else ""), r["metric"], f"{r['measured']:.1f}",
                     f"{r['predicted']:.1f}", f"{r['error']:+.1%}"])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += [""] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("  * held back from the fit: a prediction (error = predicted / measured - 1)")
    if "saved_to" in report:
        lines.append(f"saved to {report['saved_to']} ('--chips this' uses these factors)")
    return "\n".join(lines)
