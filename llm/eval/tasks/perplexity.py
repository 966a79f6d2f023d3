"""Perplexity tasks: LAMBADA (last-word prediction) and perplexity on any text (the harness's wikitext semantics).

``lambada_openai`` (Paperno et al. 2016, OpenAI's version of the test set):
the context is the passage without its last word, the continuation is
``" " + last word`` (split on single spaces). acc counts a passage when every
token of the continuation is the model's greedy choice; perplexity is
exp(-mean log-likelihood) of the continuations.

``text`` (``--text FILES``): each file is one document (a ``.jsonl`` file: each
line's ``"text"``), scored with ``loglikelihood_rolling`` (every token
predicted once, in disjoint windows). As the harness's wikitext task defines
them, the log-likelihoods and the counts are summed over all documents first:
word_perplexity = exp(-sum ll / sum words), byte_perplexity = exp(-sum ll /
sum bytes), bits_per_byte = -sum ll / sum bytes / ln 2, where words are
``len(re.split(r"\\s+", text))`` and bytes are UTF-8 bytes.
"""

from __future__ import annotations

import json
import os

from ..metrics import count_bytes, count_words
from .base import LOGLIKELIHOOD, ROLLING, Metric, Request, Task, TaskError


class Lambada(Task):
    """LAMBADA: predict the passage's last word."""

    def doc_to_text(self, doc):
        return " ".join(doc["text"].split(" ")[:-1])

    def doc_to_target(self, doc):
        return " " + doc["text"].split(" ")[-1]

    def requests(self, doc, context):
        return [Request(LOGLIKELIHOOD, (context, self.doc_to_target(doc)))]

    def process_results(self, doc, results):
        ll, is_greedy = results[0]
        return {"perplexity": ll, "acc": float(is_greedy)}


class TextPerplexity(Task):
    """Rolling log-likelihood of whole documents (``{"text": ...}``): word and byte perplexity, bits per byte."""

    def doc_to_text(self, doc):
        return ""

    def doc_to_target(self, doc):
        return doc["text"]

    def context(self, doc, shots):
        return ""

    def requests(self, doc, context):
        return [Request(ROLLING, (doc["text"],))]

    def process_results(self, doc, results):
        (ll,) = results
        words, nbytes = count_words(doc["text"]), count_bytes(doc["text"])
        return {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes), "bits_per_byte": (ll, nbytes)}


def lambada_openai() -> Lambada:
    """The harness's ``lambada_openai`` (its ``lambada`` group's OpenAI member)."""
    return Lambada(name="lambada_openai", dataset="lambada_openai", eval_split="test", fewshot_split="test",
                   output_type=LOGLIKELIHOOD, harness_name="lambada_openai",
                   metrics=[Metric("perplexity", "perplexity", higher_is_better=False), Metric("acc")])


def text_perplexity() -> TextPerplexity:
    """Perplexity on the user's text files (documents from ``read_text_documents``)."""
    return TextPerplexity(name="text", dataset="text", eval_split="text", output_type=ROLLING, harness_name="wikitext",
                          metrics=[Metric("word_perplexity", "weighted_perplexity", higher_is_better=False),
                                   Metric("byte_perplexity", "weighted_perplexity", higher_is_better=False),
                                   Metric("bits_per_byte", "bits_per_byte", higher_is_better=False)])


def read_text_documents(paths) -> list[dict]:
    """Documents for the ``text`` task: one per text file, or one per line of a ``.jsonl`` file (its "text").

    Errors name the file (and line) and say what is wrong.
    """
    docs = []
    for path in paths:
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise TaskError(f"cannot read the text file {path}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{path} is not UTF-8 text ({e})") from None
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise TaskError(f'{path}, line {n}: each line must be a JSON object with a "text" string')
                if obj["text"]:
                    docs.append({"text": obj["text"], "source": f"{path}:{n}"})
        elif text:
            docs.append({"text": text, "source": path})
    return docs


#: name -> factory, for the registry
TASKS = {"lambada_openai": lambada_openai, "text": text_perplexity}

__all__ = ["Lambada", "TextPerplexity", "lambada_openai", "text_perplexity", "read_text_documents", "TASKS"]
