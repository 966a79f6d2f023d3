"""GSM8K (Cobbe et al. 2021): grade-school maths word problems, answered by greedy generation.

Two of the harness's variants:

- ``gsm8k``: 5-shot by default, examples drawn (seeded) from the training
  split, each ``"Question: {question}\\nAnswer: {worked solution ending in '#### N'}"``;
  generation stops at "Question:" (or "</s>", "<|im_end|>").
- ``gsm8k_cot``: the 8 fixed chain-of-thought exemplars of Wei et al. (2022),
  ``"Q: {question}\\nA: {reasoning}. The answer is N."``; stops at "Q:".

The answer is read from the generated text twice, by two filters:
``strict-match`` (gsm8k: the number after "#### "; gsm8k_cot: after "The answer
is ") and ``flexible-extract`` (the last number-like string in the text). Each
is compared with the gold answer by exact match after removing commas, "$", a
trailing ".", everything up to "#### ", and case (``metrics.exact_match``).
"""

from __future__ import annotations

from ..metrics import exact_match, regex_extract
from .base import GENERATE, Metric, Request, Task

#: regexes removed from both answers before comparing, as the harness's GSM8K tasks do
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
#: flexible-extract: the last match of this pattern
FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"

#: the chain-of-thought exemplars of gsm8k_cot (question, answer), in the harness's order
COT_EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
     "did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)


class GSM8K(Task):
    """``gsm8k``: "Question: ...\\nAnswer:", few-shot examples with their worked solutions; strict "#### N"."""

    strict_pattern = "#### (\\-?[0-9\\.\\,]+)"

    def doc_to_text(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc):
        return doc["answer"]

    def requests(self, doc, context):
        return [Request(GENERATE, (context, dict(self.generation_kwargs)))]

    def extract(self, completion: str) -> dict[str, str]:
        """The answers the two filters read from a completion ("[invalid]" when none)."""
        return {"strict-match": regex_extract(completion, self.strict_pattern),
                "flexible-extract": regex_extract(completion, FLEXIBLE, group_select=-1)}

    def process_results(self, doc, results):
        gold = self.doc_to_target(doc)
        return {f"exact_match,{name}": exact_match(answer, gold, IGNORE, ignore_case=True)
                for name, answer in self.extract(results[0]).items()}


class GSM8KCoT(GSM8K):
    """``gsm8k_cot``: "Q: ...\\nA:" after the 8 fixed exemplars; strict "The answer is N."."""

    strict_pattern = "The answer is (\\-?[0-9\\.\\,]+)."

    def fixed_fewshot(self):
        return [{"question": q, "target": a} for q, a in COT_EXEMPLARS]

    def doc_to_text(self, doc):
        return f"Q: {doc['question']}\nA:"

    def doc_to_target(self, doc):
        return doc["answer"].split("####")[-1].strip() if "answer" in doc else doc["target"]


_METRICS = [Metric("exact_match,strict-match"), Metric("exact_match,flexible-extract")]


def gsm8k() -> GSM8K:
    """The harness's ``gsm8k`` (5-shot from the training split)."""
    return GSM8K(name="gsm8k", dataset="gsm8k", eval_split="test", fewshot_split="train", num_fewshot=5,
                 output_type=GENERATE, metrics=list(_METRICS), harness_name="gsm8k",
                 generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                    "temperature": 0.0})


def gsm8k_cot() -> GSM8KCoT:
    """The harness's ``gsm8k_cot`` (8 fixed chain-of-thought exemplars)."""
    return GSM8KCoT(name="gsm8k_cot", dataset="gsm8k", eval_split="test", first_n=True, num_fewshot=8,
                    output_type=GENERATE, metrics=list(_METRICS), harness_name="gsm8k_cot",
                    generation_kwargs={"until": ["Q:", "</s>", "<|im_end|>"], "do_sample": False})


#: name -> factory, for the registry
TASKS = {"gsm8k": gsm8k, "gsm8k_cot": gsm8k_cot}

__all__ = ["IGNORE", "FLEXIBLE", "COT_EXEMPLARS", "GSM8K", "GSM8KCoT", "gsm8k", "gsm8k_cot", "TASKS"]
