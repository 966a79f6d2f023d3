"""`python -m llm <command>`: one entry point for the project's jobs.

Each command lives in its own module with a ``main(argv)`` function; this file
only dispatches, so ``python -m llm demo --help`` shows that command's flags.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("llm.train", "pre-train a GPT on a text corpus (with no flags: a small model on Shakespeare)"),
    "demo": ("llm.demo", "train a small character-level language model with the engine and watch its loss fall"),
    "generate": ("llm.generate", "continue a prompt with a trained checkpoint (greedy, temperature, top-k, top-p)"),
    "size": ("llm.sizing", "parameter count, training FLOPs per token and compute-optimal tokens of a model preset"),
    "tokenizer": ("llm.tokenizer.cli", "train a byte-level BPE tokenizer, or encode / decode with one"),
    "sft": ("llm.post.sft", "supervised fine-tuning on conversations or instructions (full or LoRA), loss on answers"),
    "dpo": ("llm.post.dpo", "direct preference optimisation on (prompt, chosen, rejected) pairs (sigmoid, IPO, hinge)"),
    "eval": ("llm.eval.cli", "score a checkpoint on benchmarks (MMLU, ARC, GSM8K, HumanEval...) as lm-eval does"),
    "reward": ("llm.post.reward", "train a reward model on preference pairs / rankings from an SFT checkpoint"),
    "ppo": ("llm.post.ppo", "RLHF: PPO on a policy with a reward model or a programmatic reward (TRL's semantics)"),
    "pipeline": ("llm.post.pipeline", "the whole roadmap in one run: pre-train, SFT, reward model, PPO and DPO, eval, report"),
    "report": ("llm.eval.report", "a Markdown report card of run folders: training curves and evaluations"),
    "gradients": ("llm.plots", "summarise and plot the per-layer statistics of runs trained with --grad-stats"),
}


def usage() -> str:
    lines = ["usage: python -m llm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`python -m llm <command> --help` explains each command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m llm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
