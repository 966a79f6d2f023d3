"""`python -m llm pipeline`: the whole roadmap in one run, each stage an ordinary command that can be run alone.

    python -m llm pipeline                                   # every stage, runs/pipeline/, ~30 minutes on a 2-core CPU
    python -m llm pipeline --stages ppo,eval,report          # some stages (the earlier ones' outputs must exist)
    python -m llm pipeline --dry-run                         # print the commands only

The stages, each one command (printed before it runs, so it can be copied and
run alone), writing into its own folder of ``--out-dir`` (``FOLDERS``: ``1-pretrain``, ``data``,
``2-sft``, ``3-reward``, ``4-ppo``, ``5-dpo``):

    pretrain   python -m llm train      the tokenizer (byte-level BPE, trained on the default corpus and cached),
                                        then the `tiny` GPT pre-trained on it; then `python -m llm eval` on
                                        benchmarks (--eval-tasks)
    data       the task's files         arithmetic (``llm.post.arithmetic``): SFT conversations, preference pairs,
                                        PPO prompts; a fifth of the problems held out from every stage
    sft        python -m llm sft        supervised fine-tuning on the conversations (the chat tokens added)
    reward     python -m llm reward     a reward model from the SFT model on the preference pairs
    ppo        python -m llm ppo        PPO on the programmatic reward (exact answers), value model from the reward
                                        model, KL to the SFT model (--ppo-reward model: optimise the reward model
                                        instead, still scored on exact answers)
    dpo        python -m llm dpo        DPO on the same preference pairs: the alternative to reward model + PPO
    eval       held-out evaluation      every model on the held-out problems (greedy exact match, replies that end
                                        with <|end|>, KL to the SFT model), written as eval-arithmetic.json beside
                                        each checkpoint, and the same benchmarks as after pre-training
    report     python -m llm report     the report card: every stage's curves and evaluations, OUT_DIR/report.md

A training stage whose checkpoint has reached its steps is skipped, one that
stopped earlier is resumed (``--overwrite`` runs them again from the start),
so an interrupted pipeline continues where it stopped. The stages
print their wall time, and the run ends with the held-out table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

STAGES = ("pretrain", "data", "sft", "reward", "ppo", "dpo", "eval", "report")
#: the folder of each stage's outputs (numbered so that listings and the report card follow the roadmap)
FOLDERS = {"pretrain": "1-pretrain", "data": "data", "sft": "2-sft", "reward": "3-reward", "ppo": "4-ppo",
           "dpo": "5-dpo"}


class PipelineError(RuntimeError):
    """A stage failed or cannot start; the message names it and what to do."""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm pipeline`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m llm pipeline",
        description="The roadmap in one run: tokenizer and pre-training, evaluation, SFT, a reward model, PPO (and "
                    "DPO as the alternative) on a task with a programmatic reward (held-out arithmetic), evaluation "
                    "of every model, and the report card. Each stage is an ordinary `python -m llm` command, printed "
                    "before it runs so that it can be run alone.",
        epilog="Folders: OUT_DIR/{1-pretrain,data,2-sft,3-reward,4-ppo,5-dpo}, OUT_DIR/report.md. Stages already done are "
               "skipped (--overwrite runs them again).")
    p.add_argument("--out-dir", default="runs/pipeline", metavar="DIR", help="where every stage writes (default "
                   "runs/pipeline)")
    p.add_argument("--stages", default=",".join(STAGES), metavar="LIST",
                   help=f"comma-separated stages to run, in this order: {','.join(STAGES)} (default: all)")
    p.add_argument("--overwrite", action="store_true", help="run stages again even if their output exists")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--seed", type=int, default=1337, help="every stage's --seed (default 1337)")
    p.add_argument("--preset", default="tiny", help="the pre-trained model's preset (default tiny)")
    p.add_argument("--data", default="default", metavar="SOURCE",
                   help="pre-training text (default: the default corpus, Shakespeare)")
    p.add_argument("--pretrain-steps", type=int, default=2000, metavar="N", help="default 2000")
    p.add_argument("--sft-steps", type=int, default=400, metavar="N", help="default 400")
    p.add_argument("--reward-steps", type=int, default=300, metavar="N", help="default 300")
    p.add_argument("--ppo-steps", type=int, default=480, metavar="N",
                   help="optimizer steps of PPO: 16 per iteration of 64 rollouts (default 480: 30 iterations)")
    p.add_argument("--ppo-reward", choices=["arithmetic", "model"], default="arithmetic",
                   help="what PPO optimises: the exact answers (arithmetic) or the reward model's score (model); "
                        "held-out scores are exact answers either way (default arithmetic)")
    p.add_argument("--dpo-steps", type=int, default=300, metavar="N", help="default 300")
    p.add_argument("--eval-tasks", default="arc_easy,hellaswag", metavar="TASKS",
                   help="`python -m llm eval` benchmarks of the pre-trained and the post-trained models; '' for none "
                        "(default arc_easy,hellaswag)")
    p.add_argument("--eval-limit", type=int, default=200, metavar="N",
                   help="documents per benchmark (default 200)")
    return p


class Pipeline:
    """The stages of one pipeline run (see the module docstring)."""

    def __init__(self, args, log=print):
        self.args, self.log = args, log
        self.out = Path(args.out_dir)
        self.times = {}

    # -- paths -----------------------------------------------------------------------------------
    def path(self, stage, *parts) -> str:
        """A path in ``stage``'s folder (``FOLDERS``), or below the output folder."""
        return str(self.out.joinpath(FOLDERS.get(stage, stage), *parts))

    @property
    def pretrained(self) -> str:
        return self.path("pretrain", "ckpt.safetensors")

    @property
    def sft_model(self) -> str:
        return self.path("sft", "ckpt.safetensors")

    @property
    def models(self) -> dict:
        """The chat models the eval stage scores: stage -> checkpoint."""
        return {"sft": self.sft_model, "ppo": self.path("ppo", "policy.safetensors"),
                "dpo": self.path("dpo", "ckpt.safetensors")}

    # -- running commands ----------------------------------------------------------------------------
    def command(self, name: str, argv: list, ckpt: str | None = None, steps: int | None = None):
        """Run ``python -m llm NAME ARGV`` in this process. A training command whose checkpoint ``ckpt`` has
        reached ``steps`` is skipped, one that stopped earlier is resumed (unless --overwrite)."""
        shown = "python -m llm " + " ".join(shlex.quote(a) for a in [name, *argv])
        extra = []
        if ckpt is not None:
            done = checkpoint_step(ckpt)
            if done is not None and not self.args.overwrite:
                if done >= steps:
                    self.log(f"  (done: {ckpt} is at step {done}; --overwrite runs it again)\n  $ {shown}")
                    return
                self.log(f"  ({ckpt} stopped at step {done}: resuming)")
                extra = ["--resume"]
            else:
                extra = ["--overwrite"]
        self.log(f"  $ {shown}")
        if self.args.dry_run:
            return
        import importlib

        from .. import __main__ as cli

        module = importlib.import_module(cli.COMMANDS[name][0])
        code = module.main(argv + extra)
        if code:
            raise PipelineError(f"`{shown}` failed with exit code {code}; fix what it said and run the pipeline again "
                                "(finished stages are skipped)")

    def trainer_flags(self, stage: str, steps: int) -> list:
        return ["--out-dir", self.path(stage), "--max-steps", str(steps), "--seed", str(self.args.seed),
                "--no-progress"]

    # -- the stages ------------------------------------------------------------------------------------
    def pretrain(self):
        a = self.args
        self.command("train", ["--preset", a.preset, "--data", a.data, "--sample-tokens", "0",
                               "--eval-interval", str(max(a.pretrain_steps // 4, 1)),
                               *self.trainer_flags("pretrain", a.pretrain_steps)], self.pretrained, a.pretrain_steps)
        self.benchmarks("pretrain", self.pretrained)

    def benchmarks(self, stage: str, ckpt: str):
        """``python -m llm eval`` on ``--eval-tasks``, written beside the checkpoint (once)."""
        a = self.args
        out = self.path(stage, "eval-benchmarks.json")
        if not a.eval_tasks or (Path(out).exists() and not a.overwrite):
            return
        self.command("eval", ["--checkpoint", ckpt, "--tasks", a.eval_tasks, "--limit", str(a.eval_limit),
                              "--no-progress", "--output", out])

    def data(self):
        from . import arithmetic

        files = {"sft": arithmetic.sft_records(), "prefs": arithmetic.preference_records(seed=self.args.seed),
                 "prefs_heldout": arithmetic.preference_records(seed=self.args.seed, heldout=True)}
        train, heldout = arithmetic.ppo_prompts(seed=self.args.seed)
        files.update(prompts=train, heldout=heldout)
        self.log(f"  arithmetic: {len(train)} training problems, {len(heldout)} held out from every stage; "
                 f"files in {self.path('data')}")
        if not self.args.dry_run:
            for name, records in files.items():
                arithmetic.write_jsonl(self.path("data", f"arithmetic_{name}.jsonl"), records)

    def sft(self):
        a = self.args
        self.command("sft", ["--model", self.pretrained, "--data-file", self.path("data", "arithmetic_sft.jsonl"),
                             "--val-size", "32", "--lr", "1e-3", "--eval-interval", str(max(a.sft_steps // 4, 1)),
                             *self.trainer_flags("sft", a.sft_steps)], self.sft_model, a.sft_steps)

    def reward(self):
        a = self.args
        self.command("reward", ["--model", self.sft_model, "--data", self.path("data", "arithmetic_prefs.jsonl"),
                                "--val-data", self.path("data", "arithmetic_prefs_heldout.jsonl"), "--lr", "3e-4",
                                "--eval-interval", str(max(a.reward_steps // 4, 1)),
                                *self.trainer_flags("reward", a.reward_steps)], self.path("reward", "ckpt.safetensors"),
                     a.reward_steps)

    def ppo(self):
        a = self.args
        rm = self.path("reward", "ckpt.safetensors")
        reward = ["--reward", "arithmetic", "--value-model", rm] if a.ppo_reward == "arithmetic" else \
            ["--reward-model", rm, "--eval-reward", "arithmetic"]
        self.command("ppo", ["--model", self.sft_model, *reward,
                             "--prompts", self.path("data", "arithmetic_prompts.jsonl"),
                             "--eval-data", self.path("data", "arithmetic_heldout.jsonl"), "--eval-prompts", "80",
                             "--response-length", "6", "--lr", "1e-4", "--eval-interval", "80",
                             *self.trainer_flags("ppo", a.ppo_steps)], self.path("ppo", "ckpt.safetensors"), a.ppo_steps)

    def dpo(self):
        a = self.args
        self.command("dpo", ["--model", self.sft_model, "--data-file", self.path("data", "arithmetic_prefs.jsonl"),
                             "--val-size", "32", "--eval-interval", str(max(a.dpo_steps // 3, 1)),
                             *self.trainer_flags("dpo", a.dpo_steps)], self.path("dpo", "ckpt.safetensors"), a.dpo_steps)

    def eval(self):
        a = self.args
        rows = {}
        for stage, ckpt in self.models.items():
            if not Path(ckpt).exists() and not a.dry_run:
                self.log(f"  {stage}: no model at {ckpt} (stage not run); skipped")
                continue
            self.log(f"  {stage}: held-out arithmetic, {ckpt}")
            if not a.dry_run:
                rows[stage] = evaluate_arithmetic(ckpt, self.sft_model, self.path(stage, "eval-arithmetic.json"),
                                                  seed=a.seed)
        for stage in ("sft", "ppo", "dpo"):
            if Path(self.models[stage]).exists() or a.dry_run:
                self.benchmarks(stage, self.models[stage])
        if rows:
            self.log(heldout_table(rows))

    def report(self):
        self.command("report", [str(self.out), "--out", self.path("report.md")])
        if not self.args.dry_run:
            summary = self.summary()
            with open(self.path("report.md"), "a", encoding="utf-8") as f:
                f.write("\n" + summary + "\n")
            self.log(summary)

    def summary(self) -> str:
        """The roadmap at a glance (appended to the report card): held-out scores after each stage, the reward
        model's held-out pairs, PPO's trajectory and where its time went, and the stages' wall times."""
        from ..eval.report import read_metrics

        lines = ["## The roadmap at a glance", ""]
        rows = {}
        for stage in ("sft", "ppo", "dpo"):
            f = Path(self.path(stage, "eval-arithmetic.json"))
            if f.is_file():
                r = json.loads(f.read_text())["results"]["arithmetic_heldout"]
                rows[stage] = {"exact_match": r["exact_match"], "stderr": r["exact_match_stderr"], "ended": r["ended"],
                               "exact_match_sampled": r["exact_match_sampled"], "kl_to_sft": r["kl_to_sft"]}
        if rows:
            lines += ["Held-out arithmetic (problems no stage trained on):", "", heldout_table(rows), ""]
        rm = Path(self.path("reward", "metrics.jsonl"))
        if rm.is_file():
            last = [m for m in read_metrics(rm) if "val_accuracy" in m]
            if last:
                m = last[-1]
                lines += [f"Reward model on held-out preference pairs: accuracy {m['val_accuracy']:.3f}, margin "
                          f"{m['val_margin']:.3f}, loss {m['val_loss']:.4f} (chance: ln 2 = 0.6931).", ""]
        ppo = Path(self.path("ppo", "metrics.jsonl"))
        if ppo.is_file():
            records = read_metrics(ppo)
            evals = [m for m in records if "heldout_score" in m]
            if evals:
                lines += ["PPO (held-out exact match of greedy replies, KL to the SFT model per reply, sampled):", "",
                          "| step | held-out score | held-out KL | SFT model's held-out score |", "|---:|---:|---:|---:|"]
                lines += [f"| {m['step']} | {m['heldout_score']:.3f} | {m['heldout_kl']:.3f} | "
                          f"{m['ref_heldout_score']:.3f} |" for m in evals]
                lines.append("")
            shares = [(m["generate_share"], m["score_share"], m["iteration_s"]) for m in records
                      if "generate_share" in m]
            if shares:
                g, sc, it = (sum(x[k] for x in shares) / len(shares) for k in range(3))
                lines += [f"A PPO iteration took {it:.2f} s on average: {100 * g:.0f}% generating the rollouts, "
                          f"{100 * sc:.0f}% scoring them (the policy, reference and value forwards and the reward), "
                          f"{100 * (1 - g - sc):.0f}% in the PPO updates.", ""]
        times = self.load_times()
        if times:
            lines += ["Wall time per stage (minutes): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items())
                      + f"; total {sum(times.values()) / 60:.1f}.", ""]
        return "\n".join(lines)

    def save_times(self):
        """Record the stages' wall times (those of earlier invocations kept for the stages not run now)."""
        if self.args.dry_run:
            return
        times = {**self.load_times(), **self.times}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "pipeline-times.json").write_text(json.dumps({"stages_s": times}) + "\n")

    def load_times(self) -> dict:
        f = self.out / "pipeline-times.json"
        try:
            return json.loads(f.read_text())["stages_s"]
        except (OSError, ValueError, KeyError):
            return {}

    # -- all of it -------------------------------------------------------------------------------------
    def run(self, stages) -> int:
        start = time.perf_counter()
        for name in stages:
            self.log(f"== {name}")
            t0 = time.perf_counter()
            if name == "report":
                self.save_times()
            getattr(self, name)()
            self.times[name] = time.perf_counter() - t0
            self.log(f"   {name}: {self.times[name] / 60:.1f} min")
        total = time.perf_counter() - start
        self.log("== done in {:.1f} min: ".format(total / 60)
                 + ", ".join(f"{k} {v / 60:.1f}" for k, v in self.times.items()))
        return 0


def checkpoint_step(path) -> int | None:
    """The step a checkpoint was written at (from its header alone), or None when there is none."""
    from ..eval.report import checkpoint_summary

    info = checkpoint_summary(Path(path))
    step = (info or {}).get("step")
    return int(step) if isinstance(step, int) else None


def evaluate_arithmetic(ckpt: str, sft_ckpt: str, out_json: str, seed: int = 0, temperature: float = 0.7) -> dict:
    """Score the chat model ``ckpt`` on the held-out arithmetic problems and write the result as an evaluation file
    the report card reads (``python -m llm eval``'s JSON form). Returns the numbers."""
    import datetime

    from ..atomic import write_text_atomic
    from . import arithmetic
    from .prompts import render_prompts, score_responses
    from .start import load_start_model
    from .rewards import load_reward

    t0 = time.perf_counter()
    policy, tok = load_start_model(ckpt)
    ref, _ = load_start_model(sft_ckpt, "--ref")
    _, heldout = arithmetic.ppo_prompts(seed=seed)
    prompts = render_prompts(heldout, tok, policy.config.block_size - 8)
    reward = load_reward("arithmetic")
    greedy = score_responses(policy, prompts, reward, tok, length=8, sampled=False)
    sampled = score_responses(policy, prompts, reward, tok, length=8, sampled=True, temperature=temperature, ref=ref,
                              seed=seed)
    n = greedy["n"]
    results = {"arithmetic_heldout": {
        "n": n, "n_total": n, "num_fewshot": 0, "seconds": round(time.perf_counter() - t0, 2),
        "exact_match": greedy["score"], "exact_match_stderr": greedy["score_stderr"],
        "ended": greedy["ended"], "ended_stderr": None,
        "exact_match_sampled": sampled["score"], "exact_match_sampled_stderr": sampled["score_stderr"],
        "kl_to_sft": sampled["kl"], "kl_to_sft_stderr": None,
        "higher_is_better": {"exact_match": True, "ended": True, "exact_match_sampled": True, "kl_to_sft": False},
        "notes": [f"greedy replies to the {n} held-out problems (exact sum); sampled at T={temperature} for "
                  "exact_match_sampled and kl_to_sft (nats per reply, KL(model || SFT model))"]}}
    doc = {"results": results, "order": ["arithmetic_heldout"], "tasks": ["arithmetic_heldout"],
           "model": {"checkpoint": ckpt}, "settings": {"limit": None, "seed": seed},
           "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "elapsed_s": round(time.perf_counter() - t0, 2)}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_json, json.dumps(doc, indent=2) + "\n")
    return {"exact_match": greedy["score"], "stderr": greedy["score_stderr"], "ended": greedy["ended"],
            "exact_match_sampled": sampled["score"], "kl_to_sft": sampled["kl"], "n": n}


def heldout_table(rows: dict) -> str:
    """The held-out arithmetic of each model as a Markdown table."""
    lines = ["| model | exact match (greedy) | ends with <\\|end\\|> | exact match (T=0.7) | KL to SFT (nats/reply) |",
             "|---|---:|---:|---:|---:|"]
    for stage, r in rows.items():
        lines.append(f"| {stage} | {r['exact_match']:.3f} ± {r['stderr']:.3f} | {r['ended']:.3f} | "
                     f"{r['exact_match_sampled']:.3f} | {r['kl_to_sft']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m llm pipeline``: 0 when every stage ran, else the failing stage's message and exit code 2."""
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        print(f"python -m llm pipeline: error: unknown stage(s) {unknown}; the stages are {','.join(STAGES)}",
              file=sys.stderr)
        return 2
    stages = [s for s in STAGES if s in stages]  # the roadmap's order
    try:
        return Pipeline(args).run(stages)
    except PipelineError as e:
        print(f"python -m llm pipeline: error: {e}", file=sys.stderr)
        return 2


__all__ = ["STAGES", "Pipeline", "PipelineError", "evaluate_arithmetic", "heldout_table", "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
