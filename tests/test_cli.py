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


def test_chat_commands_are_not_sent_to_the_model(checkpoint, capsys, monkeypatch):
    path, _ = checkpoint("llama")
    monkeypatch.setattr("sys.stdin", io.StringIO("/system Be brief.\nhello there\n/reset\n/help\nagain\n/exit\nnever\n"))
    assert main(["chat", "--model", str(path), "--max-tokens", "4", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2  # two replies: the commands went nowhere, nothing after /exit
    assert "(system message: Be brief.)" in captured.err and "(conversation forgotten" in captured.err
    assert "/reset forgets the conversation" in captured.err


def test_chat_session_reset_system_and_ctrl_c_stops_only_the_reply(checkpoint):
    from shoal import LLM, SamplingParams
    from shoal.chat_session import STOPPED, ChatSession

    path, _ = checkpoint("llama")
    llm = LLM(str(path), progress=False)
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), system="S")
    session.reply("first", lambda text: None)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    written = []
    steps = 0
    step = llm.engine.step

    def interrupted_step():  # Ctrl-C arrives during the fourth decode step
        nonlocal steps
        steps += 1
        if steps == 4:
            raise KeyboardInterrupt
        return step()

    llm.engine.step = interrupted_step
    partial = session.reply("second", written.append)
    llm.engine.step = step
    assert written[-1] == STOPPED and "".join(written[:-1]) == partial
    assert not llm.engine.has_unfinished()  # the stopped reply's request was aborted, its blocks freed
    assert session.messages[-1] == {"role": "assistant", "content": partial.strip()}
    assert session.command("/reset").startswith("(conversation forgotten")
    assert session.messages == [{"role": "system", "content": "S"}]
    assert session.command("/system") == "(no system message)" and session.messages == []
    assert session.command("plain text") is None and session.command("/exit") == ""
    session.reply("third", lambda text: None)  # the chat goes on after a stopped reply and a reset
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
