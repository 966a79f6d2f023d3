"""Agreement with lm-evaluation-harness: the same model and the same documents, scored by lm-eval and by us.

lm-eval is a benchmark-side install in its own virtual environment (it pulls in torch and transformers,
which the project never imports):

    python3 -m venv /work/venvs/lmeval
    /work/venvs/lmeval/bin/pip install torch==2.13.0 lm-eval==0.4.13 transformers

Compare (run with the project's Python):

    .venv/bin/python benchmarks/vs_lm_eval.py --checkpoint runs/tiny/ckpt.safetensors \\
        --lmeval-python /work/venvs/lmeval/bin/python --limit 200

1. The checkpoint is exported as a Hugging Face GPT-2 folder (``save_hf_gpt2``) with a ``tokenizer.json``
   that reproduces our tokenizer (its split regex, byte-level BPE merges, ``<|endoftext|>``).
2. Each task's documents (``llm.eval.datasets.load_docs``) are written as JSON lines, and lm-eval reads
   them through its own task configuration (``dataset_path: json``, everything else as shipped).
3. lm-eval (``simple_evaluate``, model ``hf``) and ``llm.eval.evaluator.evaluate`` each score them.
4. Printed side by side: every metric and its standard error, and per request: how many prompts are
   byte-identical, the largest log-likelihood difference, greedy agreement, and identical generations.

``prompts`` mode (run with lm-eval's Python) writes ``tests/fixtures/eval/harness_requests.json``: the
requests lm-eval builds for the fixture documents of ``tests/fixtures/eval/docs.json`` (0-shot and
few-shot, seeded), which ``tests/test_eval_tasks.py`` compares with ours byte for byte:

    /work/venvs/lmeval/bin/python benchmarks/vs_lm_eval.py prompts

HumanEval and MBPP need Hugging Face ``evaluate``'s ``code_eval``, which lm-eval downloads from the Hub:
offline it is stubbed, so for them lm-eval's generations are compared with ours (not its pass@k).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DOCS = ROOT / "tests" / "fixtures" / "eval" / "docs.json"
FIXTURE_REQUESTS = ROOT / "tests" / "fixtures" / "eval" / "harness_requests.json"
DEFAULT_TASKS = "lambada_openai,arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,sciq,openbookqa,copa," \
                "social_iqa,commonsense_qa,mmlu,gsm8k_cot,humaneval,mbpp"

#: the prompt cases of the fixture: (our task name, num_fewshot)
PROMPT_CASES = [
    ("arc_easy", 0), ("arc_easy", 2), ("hellaswag", 0), ("hellaswag", 2), ("piqa", 2), ("winogrande", 0),
    ("winogrande", 2), ("boolq", 1), ("sciq", 2), ("openbookqa", 1), ("copa", 2), ("social_iqa", 1),
    ("commonsense_qa", 2), ("mmlu_anatomy", 0), ("mmlu_anatomy", 5), ("mmlu_abstract_algebra", 5),
    ("mmlu_us_foreign_policy", 3), ("lambada_openai", 0), ("lambada_openai", 1), ("gsm8k", 0), ("gsm8k", 3),
    ("gsm8k_cot", 8), ("humaneval", 0), ("mbpp", 3),
]


# ---------------------------------------------------------------------------------------------------------
# the data in the harness's shape
# ---------------------------------------------------------------------------------------------------------

def harness_docs(task_name: str, split: str, docs: list[dict]) -> tuple[str, list[dict]]:
    """(the harness's split name, documents with the harness dataset's fields) for one of our splits.

    BoolQ: the harness reads SuperGLUE's ``label`` (0/1), ours google/boolq's ``answer`` (bool). SciQ: the
    harness scores a split it calls ``test``, which we replace by validation. MMLU: one dataset per subject.
    """
    if task_name == "boolq":
        docs = [{**d, "label": int(bool(d["answer"]))} if "label" not in d else d for d in docs]
    if task_name == "sciq" and split == "validation":
        split = "test"
    if task_name.startswith("mmlu_"):
        subject = task_name[len("mmlu_"):]
        docs = [d for d in docs if d["subject"] == subject]
    return split, docs


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# lm-eval's side (runs in lm-eval's virtual environment)
# ---------------------------------------------------------------------------------------------------------

def _stub_code_eval():
    """Make ``evaluate.load("code_eval")`` (a Hub download) return a stand-in, so code tasks can be built offline."""
    import evaluate

    class _CodeEvalStub:
        def compute(self, references=None, predictions=None, k=(1,), **_):
            return [{f"pass@{j}": float("nan") for j in (k if isinstance(k, (list, tuple)) else [k])}, {}]

    evaluate.load = lambda *a, **kw: _CodeEvalStub()


def harness_task(name: str, files: dict, num_fewshot: int | None):
    """lm-eval's task ``name`` exactly as shipped, reading its splits from local JSON-lines ``files``."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = TaskManager().task_index[name]
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": dict(files)})
    task = ConfigurableTask(config=cfg)
    if num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:  # as simple_evaluate: a task fixed at 0 shots stays at 0
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    return task


def run_prompts() -> None:
    """Write the requests lm-eval builds for the fixture documents (``prompts`` mode)."""
    _stub_code_eval()
    fixture = json.loads(FIXTURE_DOCS.read_text(encoding="utf-8"))
    sys.path.insert(0, str(ROOT))
    from llm.eval.tasks import get_task

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shots in PROMPT_CASES:
            ours = get_task(name)
            files = {}
            for split, docs in fixture[ours.dataset].items():
                hsplit, hdocs = harness_docs(name, split, docs)
                path = Path(tmp) / name / f"{hsplit}.jsonl"
                write_jsonl(path, hdocs)
                files[hsplit] = str(path)
            task = harness_task(ours.harness_name, files, shots)
            task.build_all_requests(limit=None, rank=0, world_size=1)
            per_doc = {}
            for inst in task.instances:
                per_doc.setdefault(inst.doc_id, []).append(list(inst.args))
            cases.append({"task": name, "num_fewshot": shots,
                          "requests": [per_doc[i] for i in sorted(per_doc)]})
            print(f"{name} {shots}-shot: {len(per_doc)} documents, {len(task.instances)} requests")
    FIXTURE_REQUESTS.write_text(json.dumps({"lm_eval_version": _lm_eval_version(), "cases": cases}, indent=1,
                                           ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE_REQUESTS}")


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def run_harness(spec_path: str, out_path: str) -> None:
    """Score the tasks of a spec with lm-eval (``harness`` mode); writes its results and per-request answers."""
    import torch

    torch.set_num_threads(int(os.environ.get("LMEVAL_THREADS", "2")))
    _stub_code_eval()
    import lm_eval

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    tasks = [harness_task(t["harness_name"], t["files"], spec["num_fewshot"]) for t in spec["tasks"]]
    gen_kwargs = {"max_gen_toks": spec["max_gen_toks"]} if spec.get("max_gen_toks") else None
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": spec["hf_folder"], "dtype": "float32", "device": "cpu"},
        tasks=tasks, limit=spec["limit"], batch_size=spec["batch_size"], bootstrap_iters=spec["bootstrap_iters"],
        log_samples=True, gen_kwargs=gen_kwargs, confirm_run_unsafe_code=True)
    elapsed = time.perf_counter() - start
    out = {"elapsed_s": elapsed, "version": _lm_eval_version(), "results": {}, "samples": {}}
    for name, metrics in res["results"].items():
        out["results"][name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    for name, samples in res["samples"].items():
        first_filter = samples[0]["filter"] if samples else None  # one entry per document and filter: keep one
        samples = [s for s in samples if s["filter"] == first_filter]
        out["samples"][name] = [{"arguments": [list(a)[:2] if not isinstance(a[1], dict) else [a[0], None]
                                               for a in s["arguments"]],
                                 "resps": s["resps"]} for s in samples]
    Path(out_path).write_text(json.dumps(out, default=_jsonable), encoding="utf-8")


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# ---------------------------------------------------------------------------------------------------------
# our side
# ---------------------------------------------------------------------------------------------------------

def export_hf(model, tokenizer, folder: Path) -> None:
    """The model as a Hugging Face GPT-2 folder, with a ``tokenizer.json`` that encodes exactly as ours."""
    from llm.hf_gpt2 import save_hf_gpt2
    from llm.tokenizer.formats import bytes_to_unicode

    eot = tokenizer.eot_token
    save_hf_gpt2(model, folder, eos_token_id=eot)
    b2u = bytes_to_unicode()
    to_str = {i: "".join(b2u[x] for x in b) for b, i in tokenizer.mergeable_ranks.items()}
    vocab = {s: i for i, s in sorted(to_str.items())}
    merges = [f"{to_str[a]} {to_str[b]}" for a, b, _ in tokenizer.merges]
    specials = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s, i in sorted(tokenizer.special_tokens.items(),
                                                                          key=lambda kv: kv[1])]
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    name = next(s for s, i in tokenizer.special_tokens.items() if i == eot)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name, "bos_token": name, "unk_token": name,
        "model_max_length": model.config.block_size, "add_prefix_space": False}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": name, "bos_token": name, "unk_token": name}), encoding="utf-8")


class RecordingLM:
    """Passes requests to ``lm`` and keeps every (request, answer) pair, for the per-request comparison."""

    def __init__(self, lm):
        self.lm, self.log = lm, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def loglikelihood(self, requests):
        out = self.lm.loglikelihood(requests)
        self.log += [("ll", tuple(r), o) for r, o in zip(requests, out)]
        return out

    def loglikelihood_rolling(self, texts):
        out = self.lm.loglikelihood_rolling(texts)
        self.log += [("rolling", (t,), o) for t, o in zip(texts, out)]
        return out

    def generate_until(self, requests):
        out = self.lm.generate_until(requests)
        self.log += [("gen", (r[0],), o) for r, o in zip(requests, out)]
        return out


def compare(args) -> int:
    sys.path.insert(0, str(ROOT))
    from llm.checkpoint import load_model
    from llm.eval.datasets import load_docs
    from llm.eval.evaluator import EvalSettings, evaluate
    from llm.eval.lm import ModelLM
    from llm.eval.tasks import GROUPS, get_task, group_leaves, resolve_names

    names = resolve_names(args.tasks.split(","))
    leaves = [leaf for n in names for leaf in (group_leaves(n) if n in GROUPS else [n])]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vs_lm_eval_"))
    model, tokenizer, _ = load_model(args.checkpoint)
    hf = work / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    export_hf(model, tokenizer, hf)

    # the documents, once, in both shapes; documents whose answer is longer than the model's context are
    # left out of both (we note and skip them; lm-eval stops with an assertion)
    from llm.eval.evaluator import build_requests, unscorable_docs

    probe = ModelLM(model, tokenizer, progress=False)
    cache, spec_tasks, dropped = {}, [], {}
    for leaf in leaves:
        task = get_task(leaf)
        files = {}
        key = (task.dataset, task.eval_split)
        if key not in cache:
            cache[key] = load_docs(task.dataset, task.eval_split)
        if task.output_type == "multiple_choice" or task.output_type == "loglikelihood":
            docs = task.process_docs(cache[key])
            _, reqs = build_requests(task, docs, [], 0)
            bad = {id(docs[i]) for i in unscorable_docs(probe, reqs)}
            if bad:
                # process_docs may copy documents: drop by position among this task's documents
                positions = [i for i, d in enumerate(docs) if id(d) in bad]
                mine = [d for d in cache[key] if task.process_docs([d])]
                drop = {id(mine[i]) for i in positions}
                cache[key] = [d for d in cache[key] if id(d) not in drop]
                dropped[leaf] = len(drop)
        for split in dict.fromkeys([task.eval_split, task.fewshot_split]):
            if split is None:
                continue
            key = (task.dataset, split)
            if key not in cache:
                try:
                    cache[key] = load_docs(task.dataset, split)
                except Exception:  # no such split offline: lm-eval still builds its pool at start-up
                    if split == task.eval_split:
                        raise
                    continue
            hsplit, hdocs = harness_docs(leaf, split, cache[key])
            path = work / "data" / leaf / f"{hsplit}.jsonl"
            write_jsonl(path, hdocs)
            files[hsplit] = str(path)
        if task.fewshot_split and task.fewshot_split not in files and task.fewshot_split != task.eval_split:
            # a stand-in pool (the scored split) so lm-eval can start; only 0-shot scores are compared then
            files[task.fewshot_split] = files[harness_docs(leaf, task.eval_split, [])[0]]
        spec_tasks.append({"name": leaf, "harness_name": task.harness_name, "files": files})
    spec = {"hf_folder": str(hf), "tasks": spec_tasks, "limit": args.limit, "num_fewshot": args.num_fewshot,
            "batch_size": args.batch_size, "bootstrap_iters": args.bootstrap_iters,
            "max_gen_toks": args.max_gen_toks}
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")

    if dropped:
        print(f"left out of both (an answer longer than the model's context): {dropped}", file=sys.stderr)
    print(f"lm-eval: scoring {len(leaves)} tasks (work folder {work}) ...", file=sys.stderr)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_ALLOW_CODE_EVAL": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([args.lmeval_python, __file__, "harness", str(work / "spec.json"),
                           str(work / "lmeval.json")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    theirs = json.loads((work / "lmeval.json").read_text(encoding="utf-8"))

    print("ours: scoring ...", file=sys.stderr)
    lm = RecordingLM(ModelLM(model, tokenizer, batch_size=args.batch_size, progress=False))
    settings = EvalSettings(num_fewshot=args.num_fewshot, limit=args.limit, bootstrap_iters=args.bootstrap_iters,
                            max_gen_toks=args.max_gen_toks)
    start = time.perf_counter()
    rows = evaluate(lm, names, settings, log=lambda m: None,
                    loader=lambda dataset, split, data_file: cache[(dataset, split)])
    ours_s = time.perf_counter() - start
    print_comparison(rows, theirs, lm.log, leaves)
    print(f"\ntime: lm-eval {theirs['elapsed_s']:.1f} s (torch, {os.environ.get('LMEVAL_THREADS', '2')} threads), "
          f"ours {ours_s:.1f} s; lm-eval {theirs['version']}")
    return 0


def _their_value(res: dict, metric: str):
    key = metric if "," in metric else f"{metric},none"
    name, _, filt = key.partition(",")
    for cand in (key, f"{name},{filt}"):
        if cand in res:
            se = res.get(f"{name}_stderr,{filt}")
            return res[cand], (se if isinstance(se, (int, float)) else None)
    if metric == "pass@1":  # the harness names it by filter ("create_test") or by function ("pass_at_1")
        for cand in ("pass@1,create_test", "pass_at_1,none"):
            if cand in res:
                return res[cand], None
    return None, None


def _fmt(v, se=None):
    if v is None:
        return "-"
    s = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        s += f" ± {se:.4f}" if abs(se) < 1e4 else f" ± {se:.3g}"
    return s


def print_comparison(rows, theirs, log, leaves) -> None:
    from llm.eval.metrics import pooled_stderr, weighted_mean

    print(f"{'task':<34} {'metric':<30} {'lm-eval':>24} {'ours':>24} {'|diff|':>9}")
    for r in rows:
        if r.error:
            print(f"{r.task:<34} error: {r.error}")
            continue
        res = theirs["results"].get(r.task)
        for metric, (value, stderr) in r.metrics.items():
            if res is None and r.is_group:  # lm-eval ran the subjects as plain tasks: aggregate them its way
                vals = [(theirs["results"][m] .get(f"{metric},none"), theirs["results"][m].get(f"{metric}_stderr,none"),
                         r_n) for m, r_n in _leaf_sizes(r, rows)]
                tv = weighted_mean([v for v, _, _ in vals], [n for _, _, n in vals])
                ts = pooled_stderr([s for _, s, _ in vals], [n for _, _, n in vals])
            elif res is None:
                tv, ts = None, None
            else:
                tv, ts = _their_value(res, metric)
            diff = "" if tv is None or isinstance(tv, str) or math.isnan(tv) else f"{abs(tv - value):.2e}"
            if diff and abs(tv) > 1e3:  # large perplexities: the relative difference says more
                diff = f"{abs(tv - value) / abs(tv):.1e} rel"
            print(f"{r.task:<34} {metric:<30} {_fmt(tv, ts):>24} {_fmt(value, stderr):>24} {diff:>9}")
    # per request
    ours = {}
    for kind, key, answer in log:
        ours[(kind, key)] = answer
    print("\nper request (the same prompts, answered by each):")
    total = {"n": 0, "same": 0, "maxd": 0.0, "greedy": 0, "gen": 0, "gen_same": 0}
    for leaf in leaves:
        samples = theirs["samples"].get(leaf) or theirs["samples"].get(_harness_name(leaf)) or []
        n = same = greedy = gen = gen_same = 0
        maxd = 0.0
        for s in samples:
            for args_, resp in zip(s["arguments"], s["resps"]):
                n += 1
                if args_[1] is None:  # generation: resp = [text]
                    gen += 1
                    mine = ours.get(("gen", (args_[0],)))
                    if mine is not None:
                        same += 1
                        gen_same += mine == resp[0]
                    continue
                if isinstance(resp[0], (int, float)) or (isinstance(resp[0], list) and len(resp[0]) == 1):
                    val = resp[0] if isinstance(resp[0], (int, float)) else resp[0][0]
                    mine = ours.get(("rolling", (args_[0],)))
                    if mine is not None:
                        same += 1
                        maxd = max(maxd, abs(mine - val))
                    continue
                ll, is_greedy = resp[0]
                mine = ours.get(("ll", tuple(args_)))
                if mine is not None:
                    same += 1
                    maxd = max(maxd, abs(mine[0] - ll))
                    greedy += bool(mine[1]) == bool(is_greedy)
        total["n"] += n
        total["same"] += same
        total["greedy"] += greedy
        total["gen"] += gen
        total["gen_same"] += gen_same
        total["maxd"] = max(total["maxd"], maxd)
        if not leaf.startswith("mmlu_"):
            line = f"  {leaf:<22} {same}/{n} prompts identical"
            if n - gen:
                line += f"; max |Δ log-likelihood| {maxd:.2e}; is_greedy agrees on {greedy}/{n - gen}"
            if gen:
                line += f"; generations identical {gen_same}/{gen}"
            print(line)
    mm = [leaf for leaf in leaves if leaf.startswith("mmlu_")]
    if mm:
        print(f"  (mmlu: {len(mm)} subjects, included in the total)")
    print(f"  total: {total['same']}/{total['n']} prompts identical; max |Δ log-likelihood| {total['maxd']:.2e}; "
          f"is_greedy agrees on {total['greedy']}/{total['n'] - total['gen']}; generations identical "
          f"{total['gen_same']}/{total['gen']}")


def _harness_name(leaf):
    from llm.eval.tasks import get_task

    return get_task(leaf).harness_name


def _leaf_sizes(group_row, rows):
    by_name = {r.task: r for r in rows}
    from llm.eval.tasks import group_leaves

    return [(m, by_name[m].n) for m in group_leaves(group_row.task) if m in by_name and not by_name[m].error]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prompts"]:
        run_prompts()
        return 0
    if argv[:1] == ["harness"]:
        run_harness(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON", "/work/venvs/lmeval/bin/python"))
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-gen-toks", type=int, default=32,
                   help="generation length for both (lm-eval refuses max_gen_toks >= the model's context)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000)
    p.add_argument("--workdir", default=None)
    return compare(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
