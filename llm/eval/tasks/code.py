"""Code generation: HumanEval (Chen et al. 2021) and MBPP (Austin et al. 2021), scored by running unit tests.

``humaneval``: the prompt is the problem's ``prompt`` (signature and
docstring), zero-shot; generation stops at a new top-level statement
("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"), at most 1024 tokens. The
program run is ``prompt + completion``, then the problem's ``test`` and
``check(entry_point)``.

``mbpp``: the prompt states the task and its three tests between
"You are an expert Python programmer, and here is your task: ..." and
"[BEGIN]\\n", after three fixed examples (MBPP's own prompt problems 2, 3
and 4) that end with "[DONE]"; generation stops at "[DONE]". The program run
is the completion followed by the three tests.

Both report pass@k (``llm.eval.code_exec.pass_at_k``, the unbiased estimator
over n samples per problem, averaged over problems): n = 1 by default (greedy,
pass@1, as the harness's tasks), or ``--samples N`` draws N completions per
problem at temperature 0.2 with top-p 0.95 (the harness's ``humaneval_64``
settings) and reports pass@k for k in 1, 10, 100 up to N. Programs run only in
the sandbox (``llm.eval.sandbox``): a separate, isolated, resource-limited
process, 3 s each (the harness's ``code_eval`` timeout).
"""

from __future__ import annotations

from .base import GENERATE, Metric, Request, Task

#: the k of pass@k reported, those <= the number of samples
PASS_KS = (1, 10, 100)

#: MBPP's three prompt examples (its task ids 2, 3 and 4), as the harness's mbpp task shows them
MBPP_EXAMPLES = (
    {"task_id": 2,
     "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]},
    {"task_id": 3,
     "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"]},
    {"task_id": 4,
     "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]},
)


class CodeTask(Task):
    """A generation task whose completions are run against unit tests: pass@k over ``samples`` per problem."""

    samples: int = 1
    timeout_s: float = 3.0

    def program(self, doc: dict, completion: str) -> str:
        """The program that passes if and only if ``completion`` solves ``doc``."""
        raise NotImplementedError

    def configure_sampling(self, settings) -> None:
        """n samples per problem: 1 greedy (the harness's default), or N sampled at the given temperature/top-p."""
        self.samples = int(settings.code_samples)
        self.timeout_s = float(settings.code_timeout_s)
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.samples > 1:
            self.generation_kwargs = {**self.generation_kwargs, "do_sample": True,
                                      "temperature": float(settings.code_temperature),
                                      "top_p": float(settings.code_top_p)}
        self.metrics = [Metric(f"pass@{k}") for k in PASS_KS if k <= self.samples]

    def requests(self, doc, context):
        return [Request(GENERATE, (context, dict(self.generation_kwargs))) for _ in range(self.samples)]

    def process_all(self, docs: list[dict], answers: list[list[str]], settings=None) -> list[dict]:
        """Run every completion's program in the sandbox (in parallel), then pass@k per problem."""
        from ..code_exec import check_completions, pass_at_k

        checked = check_completions(docs, answers, program=self.program, timeout_s=self.timeout_s)
        out = []
        for results in checked:
            n, c = len(results), sum(1 for r in results if r.passed)
            out.append({m.name: pass_at_k(n, c, int(m.name.split("@")[1])) for m in self.metrics})
        return out


class HumanEval(CodeTask):
    """``humaneval``: complete the function whose signature and docstring are the prompt."""

    def doc_to_text(self, doc):
        return doc["prompt"]

    def doc_to_target(self, doc):
        return f"{doc['test']}\ncheck({doc['entry_point']})"

    def program(self, doc, completion):
        from ..code_exec import humaneval_program

        return humaneval_program(doc, completion)


class MBPP(CodeTask):
    """``mbpp``: write the function the text asks for, shown its three tests, after three solved examples."""

    def fixed_fewshot(self):
        return [dict(e) for e in MBPP_EXAMPLES]

    def doc_to_text(self, doc):
        t = doc["test_list"]
        return (f"You are an expert Python programmer, and here is your task: {doc['text']} Your code should pass "
                f"these tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n[BEGIN]\n")

    def doc_to_target(self, doc):
        return "\n".join(doc["test_list"][:3])

    def fewshot_answer(self, doc):
        return f"{doc['code']}\n[DONE]"

    def program(self, doc, completion):
        from ..code_exec import mbpp_program

        return mbpp_program(doc, completion, setup=False)  # the harness runs no test_setup_code


def humaneval() -> HumanEval:
    """The harness's ``humaneval`` (greedy pass@1; ``--samples N`` for pass@k)."""
    return HumanEval(name="humaneval", dataset="humaneval", eval_split="test", num_fewshot=0, output_type=GENERATE,
                     metrics=[Metric("pass@1")], harness_name="humaneval",
                     generation_kwargs={"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 1024,
                                        "do_sample": False})


def mbpp() -> MBPP:
    """The harness's ``mbpp`` (3-shot, greedy pass@1; ``--samples N`` for pass@k)."""
    return MBPP(name="mbpp", dataset="mbpp", eval_split="test", first_n=True, num_fewshot=3, target_delimiter="",
                output_type=GENERATE, metrics=[Metric("pass@1")], harness_name="mbpp",
                generation_kwargs={"until": ["[DONE]"], "do_sample": False})


#: name -> factory, for the registry
TASKS = {"humaneval": humaneval, "mbpp": mbpp}

__all__ = ["PASS_KS", "MBPP_EXAMPLES", "CodeTask", "HumanEval", "MBPP", "humaneval", "mbpp", "TASKS"]
