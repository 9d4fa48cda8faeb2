"""The `shoal` command: generate, chat, serve, bench, doctor and quantize.

Every error shoal raises on purpose becomes one line on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from shoal.bench import add_bench_parser, cmd_bench
from shoal.errors import ShoalError
from shoal.model_options import add_model_options, llm_options
from shoal.planner.cli import add_plan_parser, cmd_plan
from shoal.quant.cli import add_quantize_parser, cmd_quantize
from shoal.server.cli import add_serve_parser, cmd_serve

EXIT_USAGE = 2


def _add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, OpenAI semantics")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, OpenAI semantics")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Run a language model on whatever chips you have.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt text")
    gen.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of prompt text")
    gen.add_argument("--logprobs", type=int, default=None, help="report each token's logprob and top-K alternatives")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_options(gen)
    _add_sampling_options(gen, max_tokens=64)

    chat = sub.add_parser("chat", help="talk to the model using its chat template")
    chat.add_argument("--system", default=None, help="system message")
    add_model_options(chat)
    _add_sampling_options(chat, max_tokens=256)

    doctor = sub.add_parser("doctor", help="report devices, their memory and dtypes, and measured speed")
    doctor.add_argument("--device", default=None, help="device to measure; default: best present")
    doctor.add_argument("--quick", action="store_true", help="shorter, rougher measurement")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_plan_parser(sub)
    add_quantize_parser(sub)
    return parser


def _sampling_params(args: argparse.Namespace, logprobs: int | None = None):
    from shoal.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        logprobs=logprobs,
    )


def _load(args: argparse.Namespace):
    from shoal.llm import LLM

    return LLM(args.model, **llm_options(args))


def _parse_prompt_ids(text: str) -> list[int]:
    from shoal.errors import InvalidRequestError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InvalidRequestError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from shoal.llm import finish
    from shoal.errors import InvalidRequestError

    if (args.prompt is None) == (args.prompt_ids is None):
        raise InvalidRequestError("give either a prompt or --prompt-ids (exactly one)")
    params = _sampling_params(args, logprobs=args.logprobs)
    prompt_ids = _parse_prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
    llm = _load(args)
    if prompt_ids is None:
        prompt_ids = llm.tokenizer.encode(args.prompt)
    run = llm.generation(prompt_ids, params, args.prompt)
    if args.json:
        output = finish(run)
        print(json.dumps(_output_json(output, llm.tokenizer), ensure_ascii=False))
        return 0
    if args.prompt is not None:
        sys.stdout.write(args.prompt)
    for piece in run:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _output_json(output, tokenizer) -> dict:
    result = {
        "prompt_token_ids": output.prompt_token_ids,
        "token_ids": output.token_ids,
        "text": output.text,
        "finish_reason": output.finish_reason,
    }
    logprobs = output.outputs[0].logprobs
    if logprobs is not None:
        result["logprobs"] = [
            {
                "token_id": lp.token_id,
                "token": tokenizer.id_to_token(lp.token_id),
                "logprob": lp.logprob,
                "top_logprobs": [
                    {"token_id": tid, "token": tokenizer.id_to_token(tid), "logprob": value}
                    for tid, value in lp.top_logprobs.items()
                ],
            }
            for lp in logprobs
        ]
    return result


def cmd_chat(args: argparse.Namespace) -> int:
    from shoal.chat_session import HELP, ChatSession

    session = ChatSession(_load(args), _sampling_params(args), args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"shoal chat — {HELP}.", file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt, Ctrl-C ends the chat (during a reply it stops the reply)
            return 0
        if not line or not line.strip():
            return 0
        said = session.command(line.strip())
        if said == "":
            return 0
        if said is not None:
            print(said, file=sys.stderr)
            continue
        session.reply(line.strip(), write)
        write("\n")


def cmd_doctor(args: argparse.Namespace) -> int:
    from shoal.backends.doctor import doctor_report, format_doctor_report

    report = doctor_report(device=args.device, quick=args.quick)
    print(json.dumps(report, indent=2) if args.json else format_doctor_report(report))
    return 0


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "doctor": cmd_doctor, "serve": cmd_serve, "bench": cmd_bench,
    "plan": cmd_plan, "quantize": cmd_quantize,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
