"""`python -m training COMMAND`: schema, validate, run, warm, generate, merge, make-tiny-model, make-toy-data.

`schema` and `validate` without `--model` import no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from training.families import FAMILIES
from training.spec import EXIT_OK, EXIT_USER_ERROR
from training.tiny import SIZES


def _validate(args) -> int:
    from training.formats import check_file

    try:
        report, examples = check_file(args.file, args.method)
    except OSError as exc:
        print(f"{args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.model and examples:
        from transformers import AutoTokenizer

        from training.chat import TemplateError
        from training.data import token_length_stats

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        try:
            report.token_lengths = token_length_stats(examples, tokenizer, args.max_length)
        except TemplateError as exc:  # the file is fine; the model's template cannot render it
            field, _, reason = str(exc).partition(": ")
            report.error(0, field, f"{reason} (the chat template of {args.model})")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(f"file: {args.file}\nrows: {report.rows}\nformat: {report.format or '-'} ({report.method or '-'})")
        if report.format == "sft_messages":
            print(f"tool examples: {report.tool_examples}\nassistant messages of weight 0: {report.untrained_messages}")
        for title, items, total in (
            ("errors", report.errors, report.error_count),
            ("warnings", report.warnings, report.warning_count),
        ):
            more = f" (first {len(items)} listed)" if total > len(items) else ""
            print(f"{title}: {total}{more}")
            for p in items:
                print(f"  line {p.line}: {p.field}: {p.reason}")
        if report.token_lengths:
            t = report.token_lengths
            print(
                f"tokens: p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; "
                f"{t['truncated_rows']} rows longer than max_length {t['max_length']}"
            )
    return EXIT_OK if report.ok else EXIT_USER_ERROR


def _kill_when_orphaned(grace_s: float) -> None:
    """Once the parent is gone (its death also sends SIGTERM, which starts a checkpoint), the kernel kills this
    process `grace_s` later (SIGALRM's default action), whatever its main thread is doing."""
    import math
    import os
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        signal.alarm(max(1, math.ceil(grace_s)))

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schema", help="print the JSON schema of the training spec")
    p = sub.add_parser("validate", help="check a JSONL data file and print a report")
    p.add_argument("file")
    p.add_argument("--method", choices=["dpo", "sft", "kto"])
    p.add_argument("--model", help="model folder whose tokenizer measures token lengths")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("run", help="train: events on stdout, outputs in --out")
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument(
        "--stop-grace-s",
        type=float,
        help="if the process that started this run dies, the run gets "
        "this long to checkpoint, then is killed (the lease it trained under expires soon after)",
    )
    p = sub.add_parser("warm", help="import the trainers once and fork runs on request (training.warm)")
    p.add_argument("socket", help="path of the Unix socket to listen on")
    p = sub.add_parser("generate", help="answer generation requests (JSON lines on stdin) with one loaded model")
    p.add_argument("model", help="a model folder or a hub id")
    p.add_argument("--revision", help="the hub id's revision")
    p.add_argument("--batch", type=int, default=8, help="requests answered together at most")
    p.add_argument("--adapter-mb", type=float, default=2048.0, help="LoRA adapters kept loaded within this size")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base and save the merged model")
    p.add_argument("base", help="the base model: a folder or a hub id")
    p.add_argument("adapter", help="the adapter's folder (PEFT's)")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--revision", help="the base hub id's revision")
    p = sub.add_parser(
        "make-tiny-model", help="build a small random model (a Llama, or --family) and a local tokenizer"
    )
    p.add_argument("dir")
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--family", choices=list(FAMILIES), help="an architecture with its chat format and special tokens")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("make-toy-data", help="write synthetic data with a learnable signal")
    p.add_argument("out")
    p.add_argument("--method", choices=["dpo", "sft", "kto", "rft"], default="dpo")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-words", type=int, default=0, help="filler words before each question")
    args = parser.parse_args(argv)

    if args.command == "schema":
        from training.spec import spec_json_schema

        print(json.dumps(spec_json_schema(), indent=1))
        return EXIT_OK
    if args.command == "validate":
        return _validate(args)
    if args.command == "run":
        from training.distributed import die_with_launcher, finish_rank, in_launched_rank
        from training.events import claim_stdout

        if in_launched_rank():  # a process of `accelerate launch` (fsdp, deepspeed-tp)
            die_with_launcher()
        if args.stop_grace_s:
            _kill_when_orphaned(args.stop_grace_s)
        claim_stdout()
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
        from training.run import main as run_main

        code = run_main(args.spec, args.out, args.resume)
        return finish_rank(args.out, code) if in_launched_rank() else code
    if args.command == "warm":
        from training.forkserver import serve

        return serve(args.socket)
    if args.command == "generate":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
        if args.engine == "vllm":
            from training.generate_vllm import main as generate_main
        else:
            from training.generate import main as generate_main

        return generate_main(args.model, args.revision, args.batch, args.adapter_mb)
    if args.command == "merge":
        from training.merge import merge

        merge(args.base, args.adapter, args.out, args.revision)
        return EXIT_OK
    if args.command == "make-tiny-model":
        from training.tiny import make_tiny_model

        n = make_tiny_model(args.dir, args.size, args.seed, args.family)
        print(f"{args.dir}: {n:,} parameters")
        return EXIT_OK
    if args.command == "make-toy-data":
        from training.toy_data import write_toy_data

        n = write_toy_data(args.out, args.method, args.rows, args.seed, args.context_words)
        print(f"{args.out}: {n} rows")
        return EXIT_OK
    raise ValueError(f"Unknown command: {args.command}")


if __name__ == "__main__":
    sys.exit(main())
