"""`shoal plan --calibrate`: run shoal's own engine on this machine over a few shapes, fit this
machine's efficiency factors, and check them on a shape held back from the fit.

The same code calibrates any device the engine runs on (`--device cuda`, `--device npu`): the
chip's peaks come from `shoal doctor`'s measurement, the factors from timing the engine.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from shoal.planner.catalog import Chip, this_machine
from shoal.planner.cost import Deployment, Factors, Layout, decode_step_time, prefill_time
from shoal.planner.errors import PlanError
from shoal.planner.shapes import ModelShape, load_shape
from shoal.planner.fitting import golden_section_min

PREFILL_TRIALS, DECODE_TRIALS = 5, 3
FIT = ("prefill_compute", "decode_compute", "layer_overhead_us", "step_overhead_us")
BOUNDS = {"prefill_compute": (0.01, 1.0), "decode_compute": (0.01, 1.0), "layer_overhead_us": (0.0, 100000.0),
          "step_overhead_us": (0.0, 2000000.0)}


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


RUNS = [
    Run("demo MLA+MoE (256 hidden, 4 layers)", "demo", prompts=8, prompt_len=128, batch=8, decode_tokens=16),
    Run("llama 512x4", "llama:512,4,8,4,1408", prompts=8, prompt_len=128, batch=8, decode_tokens=16),
    Run("llama 1024x4", "llama:1024,4,16,4,2816", prompts=4, prompt_len=256, batch=16, decode_tokens=16),
    Run("llama 768x6 (held back)", "llama:768,6,12,4,2048", prompts=8, prompt_len=192, batch=12, decode_tokens=16,
        held_back=True),
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


def measure_engine(path: str, run: Run, device: str | None) -> dict:
    """Time shoal's engine: seconds to prefill the prompts, and seconds per decode step of the batch."""
    import random

    from shoal.llm import LLM
    from shoal.sampling_params import SamplingParams

    llm = LLM(path, device=device, dtype="bfloat16", progress=False, enable_prefix_caching=False,
              max_num_seqs=max(run.batch, run.prompts),
              max_num_batched_tokens=max(2048, run.prompts * run.prompt_len, run.batch * run.prompt_len))
    rng = random.Random(0)
    vocab = llm.model_config.vocab_size
    engine = llm.engine

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(run.prompt_len)] for _ in range(n)]

    def steps_timed(ps, tokens: int, skip: int) -> float:
        """Seconds per engine step after the first `skip` steps, running `ps` to `tokens` tokens each."""
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        for ids in ps:
            engine.add_request(ids, params)
        for _ in range(skip):
            engine.step()
        llm.backend.synchronize()
        start, count = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            count += 1
        llm.backend.synchronize()
        return (time.perf_counter() - start) / max(count, 1)

    # Warm up on the very shapes measured: a CPU matmul library prepares its kernels per shape, and the
    # first prefill of a new shape can take several times as long as the next.
    steps_timed(prompts(run.prompts), 1, 0)
    steps_timed(prompts(run.batch), 3, 1)
    # Best of several: on a shared machine other work only ever slows a trial down.
    prefill = min(steps_timed(prompts(run.prompts), 1, 0) for _ in range(PREFILL_TRIALS))
    decode = min(steps_timed(prompts(run.batch), run.decode_tokens + 1, 1) for _ in range(DECODE_TRIALS))
    return {"prefill_s": prefill, "decode_step_s": decode}


def predict_run(shape: ModelShape, chip: Chip, factors: Factors, run: Run) -> dict:
    dep = Deployment(chip, Layout(1), quant="bf16", kv_dtype="bf16", overlap=False)
    prefill = prefill_time(shape, dep, factors, run.prompts, run.prompt_len)[0]
    context = run.prompt_len + run.decode_tokens / 2
    step = decode_step_time(shape, dep, factors, run.batch, context)[0]
    return {"prefill_s": prefill, "decode_step_s": step}


def fit(chip: Chip, data: list[tuple[ModelShape, Run, dict]], rounds: int = 6) -> Factors:
    """Factors minimising squared log error of prefill time and decode step time over `data`."""
    factors = Factors(memory=0.8, overlap=0.0)

    def loss(trial: Factors) -> float:
        total = 0.0
        for shape, run, measured in data:
            got = predict_run(shape, chip, trial, run)
            total += sum(math.log(got[k] / measured[k]) ** 2 for k in ("prefill_s", "decode_step_s"))
        return total

    for _ in range(rounds):
        for name in FIT:
            value = golden_section_min(lambda v, name=name: loss(factors.replaced(**{name: v})), *BOUNDS[name])
            factors = factors.replaced(**{name: value})
    return factors


def calibrate(device: str | None = "cpu", path: str | Path | None = None, progress: bool = True,
              runs: list[Run] | None = None, measure: Callable[[str, Run, str | None], dict] | None = None,
              chip: Chip | None = None) -> dict:
    """Measure each run, fit on those not held back, predict all; save the factors to `path`."""
    from tqdm import tqdm

    from shoal.config import DEMO_MODEL_PATH

    runs = runs or RUNS
    measure = measure or measure_engine
    chip = chip or this_machine(quick=False, device=device)
    data = []
    with tempfile.TemporaryDirectory(prefix="shoal-calibrate-") as tmp:
        for i, run in enumerate(tqdm(runs, desc="calibrate", disable=not progress)):
            if run.model == "demo":
                folder = str(DEMO_MODEL_PATH)
            elif run.model.startswith("llama:"):
                folder = str(build_llama(run.model, Path(tmp) / f"run{i}"))
            else:
                folder = run.model
            data.append((load_shape(folder), run, measure(folder, run, device)))
    train = [d for d in data if not d[1].held_back]
    if not train:
        raise PlanError("calibration needs at least one shape that is not held back")
    factors = fit(chip, train)
    rows = []
    for shape, run, measured in data:
        got = predict_run(shape, chip, factors, run)
        for key, label, tokens in (("prefill_s", "prefill tok/s", run.prompts * run.prompt_len),
                                   ("decode_step_s", "decode tok/s", run.batch)):
            rows.append({"run": run.name, "held_back": run.held_back, "metric": label,
                         "measured": tokens / measured[key], "predicted": tokens / got[key],
                         "error": measured[key] / got[key] - 1})
    report = {
        "chip": {"name": chip.name, "bf16_tflops": chip.bf16_tflops, "memory_bw_gbps": chip.memory_bw_gbps},
        "factors": {k: v for k, v in asdict(factors).items() if k in FIT},
        "fitted_on": [r.name for r in runs if not r.held_back],
        "held_back": [r.name for r in runs if r.held_back],
        "rows": rows,
    }
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        report["saved_to"] = str(path)
    return report


def format_calibration(report: dict) -> str:
    chip = report["chip"]
    lines = [f"{chip['name']}: measured peak {chip['bf16_tflops']:.3f} TFLOP/s bf16 matmul, "
             f"{chip['memory_bw_gbps']:.1f} GB/s memory",
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
