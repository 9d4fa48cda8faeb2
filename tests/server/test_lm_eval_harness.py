"""lm-evaluation-harness's `local-completions` model against the server, from local task files and without
the network: a loglikelihood (multiple-choice) task and a generate_until task run, and every item's
loglikelihood equals transformers' on the same float32 model within 1e-3.

Opt-in: lm-eval is heavy and not a test dependency. Point SHOAL_LM_EVAL at its `lm_eval` command (for
example from a separate virtual environment: `pip install lm_eval`), or the test is skipped."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from shoal import LLM
from shoal.tokenizer import Tokenizer

LM_EVAL = os.environ.get("SHOAL_LM_EVAL")
pytestmark = pytest.mark.skipif(not LM_EVAL or not os.path.exists(LM_EVAL),
                                reason="set SHOAL_LM_EVAL to an lm_eval command to run lm-evaluation-harness")

CHOICES = [
    {"question": "The quick brown", "choices": [" fox", " dog", " café"], "answer": 0},
    {"question": "Héllo", "choices": [" wörld", " world", " naïve"], "answer": 0},
    {"question": "The lazy dog jumps over the", "choices": [" fox", " lazy dog"], "answer": 1},
]
GENERATIONS = [{"prompt": "The quick brown fox", "target": " jumps"}, {"prompt": "Héllo", "target": " wörld"}]


def write_tasks(folder) -> None:
    with open(folder / "choice.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in CHOICES)
    with open(folder / "gen.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in GENERATIONS)
    (folder / "shoal_choice.yaml").write_text(f"""task: shoal_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "shoal_gen.yaml").write_text(f"""task: shoal_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateAPI._encode_pair: trailing spaces move to the continuation, which is what the whole
    encodes to past the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


def test_lm_eval_local_completions_matches_transformers(checkpoint, serve, tmp_path):
    folder, model = checkpoint("llama")
    server = serve(LLM(str(folder), dtype="float32", progress=False), api_key=None)
    write_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "unused", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    model_args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                  "tokenized_requests=True,num_concurrent=1,max_retries=1")
    result = subprocess.run(
        [LM_EVAL, "run", "--model", "local-completions", "--model_args", model_args, "--tasks", "shoal_choice,shoal_gen",
         "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    samples = {}
    for path in (tmp_path / "out").rglob("samples_*.jsonl"):
        task = "choice" if "shoal_choice" in path.name else "gen"
        samples[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(samples["choice"]) == len(CHOICES) and len(samples["gen"]) == len(GENERATIONS)
    tokenizer = Tokenizer(folder)
    compared = 0
    for sample in samples["choice"]:
        arguments = sample["arguments"]  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        pairs = [(a["arg_0"], a["arg_1"]) for a in arguments.values()] if isinstance(arguments, dict) else arguments
        for (context, continuation), resp in zip(pairs, sample["resps"]):
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            ids = context_ids + continuation_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            expected = sum(float(logprobs[j - 1, ids[j]]) for j in range(len(context_ids), len(ids)))
            loglikelihood = float(resp[0][0])
            assert loglikelihood == pytest.approx(expected, abs=1e-3), (context, continuation)
            compared += 1
    assert compared == sum(len(item["choices"]) for item in CHOICES)
    for sample in samples["gen"]:
        assert isinstance(sample["resps"][0][0], str)  # generate_until answered (a random model's text)
