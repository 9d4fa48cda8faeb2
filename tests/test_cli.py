"""The `shoal` command: the generate --json contract that outside checks use, chat, and doctor."""

from __future__ import annotations

import io
import json

import torch

from shoal.cli import main


def test_generate_json_contract_matches_transformers(checkpoint, capsys):
    path, reference = checkpoint("qwen2")
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[0, len(prompt):].tolist()
    code = main(["generate", "--model", str(path), "--max-tokens", "12", "--temperature", "0", "--dtype", "float32",
                 "--json", "--ignore-eos", "--prompt-ids", ",".join(map(str, prompt)), "--logprobs", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_token_ids"] == prompt
    assert result["token_ids"] == expected
    assert isinstance(result["text"], str)
    assert len(result["logprobs"]) == 12
    assert all(len(entry["top_logprobs"]) == 2 for entry in result["logprobs"])


def test_generate_text_prompt_streams_to_stdout(checkpoint, capsys):
    path, _ = checkpoint("llama")
    assert main(["generate", "--model", str(path), "--max-tokens", "5", "--seed", "1", "The quick"]) == 0
    assert capsys.readouterr().out.startswith("The quick")


def test_chat_reads_turns_from_stdin(checkpoint, capsys, monkeypatch):
    path, _ = checkpoint("llama")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n"))
    assert main(["chat", "--model", str(path), "--max-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2  # one streamed reply per turn


def test_doctor_json(capsys):
    assert main(["doctor", "--quick", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    text = json.dumps(report)
    assert "cpu" in text and "bfloat16" in text


def test_generate_with_an_8bit_kv_cache_and_int8_weights(checkpoint, capsys):
    path, _ = checkpoint("llama")
    assert main(["generate", "--model", str(path), "--max-tokens", "6", "--temperature", "0", "--ignore-eos",
                 "--dtype", "float32", "--kv-cache-dtype", "int8", "--quant", "int8", "--prompt-ids", "5,6,7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"
