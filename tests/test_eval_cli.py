"""`python -m llm eval` and `python -m llm report` end to end on a tiny checkpoint and fixture data."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from llm.checkpoint import save_model
from llm.eval import cli, report
from llm.model import GPT, GPTConfig
from llm.tokenizer import Tokenizer

DOCS = json.loads((Path(__file__).parent / "fixtures" / "eval" / "docs.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder: a tiny trained-looking checkpoint (random weights), its metrics.jsonl, fixture data files."""
    root = tmp_path_factory.mktemp("run")
    text = " ".join(d["question"] + " " + " ".join(d["choices"]["text"]) for d in DOCS["arc_easy"]["test"]) * 3
    tok = Tokenizer.train("Question: Answer: the a of to is. " + text, vocab_size=300)
    config = GPTConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config, generator=np.random.default_rng(0))
    save_model(root / "ckpt.safetensors", model, tokenizer=tok, extra_metadata={"step": 20})
    with open(root / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(10, 30, 10):
            f.write(json.dumps({"step": step, "loss": 6.0 - step / 10, "tokens": step * 100}) + "\n")
        f.write(json.dumps({"step": 20, "loss": 4.0, "val_loss": 4.5, "val_ppl": math.exp(4.5)}) + "\n")
        f.write("{not json\n")
    for name, docs in (("arc", DOCS["arc_easy"]["test"]), ("piqa_bad", [{"goal": "g", "sol1": "x", "label": 0}])):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    (root / "notes.txt").write_text("to be or not to be, that is the question", encoding="utf-8")
    return root


def test_eval_prints_the_table_and_writes_json(run_dir, capsys):
    out = run_dir / "eval-test.json"
    code = cli.main(["--checkpoint", str(run_dir / "ckpt.safetensors"), "--tasks", "arc_easy,piqa",
                     "--data-file", f"arc_easy={run_dir / 'arc.jsonl'}", "--data-file",
                     f"piqa={run_dir / 'piqa_bad.jsonl'}", "--text", str(run_dir / "notes.txt"),
                     "--output", str(out), "--no-progress", "--batch-size", "3"])
    captured = capsys.readouterr()
    assert code == 1  # one task failed; the others ran
    assert "| arc_easy | acc ↑ |" in captured.out and "| text | word_perplexity ↓ |" in captured.out
    assert "| piqa | error:" in captured.out and "sol2" in captured.out
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["order"] == ["arc_easy", "piqa", "text"]
    arc = doc["results"]["arc_easy"]
    assert arc["n"] == 4 and 0.0 <= arc["acc"] <= 1.0 and arc["acc_stderr"] > 0 and len(arc["data_sha256"]) == 64
    assert arc["chance"]["acc"] == pytest.approx(np.mean([1 / len(d["choices"]["text"])
                                                          for d in DOCS["arc_easy"]["test"]]))
    assert doc["model"]["config"]["n_embd"] == 16 and doc["model"]["step"] == 20
    assert doc["settings"]["seed"] == 1234 and doc["settings"]["data_files"]["arc_easy"].endswith("arc.jsonl")
    assert "error" in doc["results"]["piqa"]
    # the text's perplexity is the model's own rolling log-likelihood, summed as the harness defines it
    from llm.checkpoint import load_model
    from llm.eval.lm import ModelLM

    model, tok, _ = load_model(run_dir / "ckpt.safetensors")
    text = (run_dir / "notes.txt").read_text()
    (ll,) = ModelLM(model, tok, progress=False).loglikelihood_rolling([text])
    assert doc["results"]["text"]["word_perplexity"] == pytest.approx(math.exp(-ll / len(text.split())), rel=1e-5)


def test_bad_input_gives_one_clear_line(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "ckpt.safetensors")
    assert cli.main(["--checkpoint", ckpt, "--tasks", "arc_easy,hellaswagg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'hellaswagg'" in err and "known tasks:" in err and "hellaswag," in err
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    assert cli.main(["--checkpoint", str(garbage), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read the checkpoint" in err and "bad.safetensors" in err
    assert cli.main(["--checkpoint", ckpt]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli.main(["--checkpoint", ckpt, "--tasks", "arc_easy", "--data-file", "arc_easy"]) == 2
    assert "TASK=FILE" in capsys.readouterr().err
    assert cli.main(["--checkpoint", ckpt, "--tasks", "arc_easy", "--num-fewshot", "mmlu=x"]) == 2
    assert "--num-fewshot" in capsys.readouterr().err
    assert cli.main(["--hf", str(tmp_path), "--tasks", "arc_easy"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_parse_num_fewshot():
    assert cli.parse_num_fewshot(None) is None
    assert cli.parse_num_fewshot("5") == 5
    assert cli.parse_num_fewshot("mmlu=5,lambada=0") == {"mmlu": 5, "lambada_openai": 0}


def test_report_collects_training_and_evaluations(run_dir, capsys, monkeypatch):
    cli.main(["--checkpoint", str(run_dir / "ckpt.safetensors"), "--tasks", "arc_easy", "--data-file",
              f"arc_easy={run_dir / 'arc.jsonl'}", "--output", str(run_dir / "eval-arc.json"), "--no-progress"])
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert report.main([str(run_dir), "--out", str(run_dir / "card.md")]) == 0
    card = (run_dir / "card.md").read_text(encoding="utf-8")
    assert "n_layer 1" in card and "step 20" in card
    assert "Training: 20 steps" in card and "| 20 | 4.5000 | 90.02 |" in card
    assert "### Evaluation `eval-arc.json`" in card and "| arc_easy | acc ↑ |" in card
    assert report.PLOT_HINT in card
    assert report.main([str(run_dir / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_report_draws_the_curves_with_matplotlib(run_dir):
    pytest.importorskip("matplotlib")  # the optional `report` extra
    text = report.build_report([run_dir], run_dir / "plots")
    png = run_dir / "plots" / f"{run_dir.name}_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({png.name})" in text and report.PLOT_HINT not in text
