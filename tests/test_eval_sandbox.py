"""The sandbox for model-written code, the HumanEval/MBPP test programs, and pass@k.

Each hostile program (infinite loop, memory bomb, fork bomb, deleting files outside its folder,
huge output) must end contained, leave no process behind, and leave the evaluator able to go on.
Tests that switch the guard off check the containment the operating system gives (limits, the
process-tree count and the kill); the others check the guard. Leftover processes are found by a
unique variable in their environment (Linux ``/proc``).
"""

import math
import os
import sys
import uuid
from fractions import Fraction

import pytest

from llm.eval.code_exec import (check_completions, check_programs, humaneval_program, mbpp_program,
                                pass_at_k)
from llm.eval.sandbox import run_program, run_programs

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts processes through Linux /proc")


def _processes_with(token: str) -> list:
    """Pids of live processes whose environment holds ``token`` (zombies have no environment)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def _run_marked(source, **kw):
    token = uuid.uuid4().hex
    result = run_program(source, env={"SANDBOX_TEST_TOKEN": token}, **kw)
    return result, _processes_with(token)


# ---------------------------------------------------------------------------
# ordinary programs
# ---------------------------------------------------------------------------


def test_a_program_that_runs_to_its_end_passes_with_its_output():
    r = run_program("import sys\nprint('hello', 6 * 7)\nprint('note', file=sys.stderr)")
    assert (r.status, r.returncode, r.stdout, r.stderr, r.reason) == ("passed", 0, "hello 42\n", "note\n", "")
    assert r.passed


def test_a_wrong_answer_fails_and_says_which_exception():
    r = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5")
    assert r.status == "failed" and r.returncode == 1 and r.reason == "AssertionError"
    assert 'program.py", line 3' in r.stderr and "sandbox_child" not in r.stderr  # the program's own frames


def test_a_syntax_error_is_the_programs_failure():
    r = run_program("def f(:\n    return 1")
    assert r.status == "failed" and r.reason.startswith("SyntaxError") and 'program.py", line 1' in r.stderr
    assert "Traceback" not in r.stderr and "sandbox_child" not in r.stderr  # printed as Python prints it for a script
    assert run_program("x = 1\0").status == "failed"


def test_runs_in_a_fresh_isolated_interpreter_in_an_empty_folder():
    r = run_program("import os, sys\nprint(sorted(os.listdir('.')))\nprint(sys.flags.isolated, sys.flags.no_site)\n"
                    "print(os.environ.get('HOME') == os.getcwd())\nprint('llm' in sys.modules)")
    assert r.stdout.splitlines() == ["['program.py']", "1 1", "True", "False"], r.stderr


def test_exit_counts_as_passing_for_scripts_and_failing_for_the_checkers():
    for source in ("import sys; sys.exit(0)", "exit()", "import os; os._exit(0)"):
        assert run_program(source).status == "passed"
        strict = run_program(source, allow_exit=False)
        assert strict.status == "failed" and "exit()" in strict.reason, source
    assert run_program("import sys; sys.exit(3)").reason == "exit status 3"


def test_run_name_decides_whether_main_blocks_run():
    source = "if __name__ == '__main__':\n    print('main')\nprint(__name__)"
    assert run_program(source).stdout == "main\n__main__\n"
    assert run_program(source, run_name="__sandbox_program__").stdout == "__sandbox_program__\n"


def test_stdin_is_closed():
    r = run_program("input()")
    assert r.status == "failed" and r.reason.startswith("EOFError")


def test_the_folder_is_removed_afterwards_even_when_the_program_locked_it():
    r = run_program("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a/b', 0)\nos.chmod('a', 0)\n"
                    "print(os.getcwd())")
    assert r.passed and r.stdout.startswith("/") and not os.path.exists(r.stdout.strip())


def test_a_sandbox_that_cannot_start_reports_an_error_not_an_exception(tmp_path):
    r = run_program("print(1)", python=str(tmp_path / "no-such-python"))
    assert r.status == "error" and r.returncode is None and "could not run the program" in r.reason


def test_a_memory_limit_too_small_for_python_is_a_sandbox_error_not_a_failure():
    r = run_program("print(1)", memory_mb=1)
    assert r.status == "error" and r.reason.startswith("the sandbox failed before the program started")


def test_bad_limits_are_refused_with_a_message():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout_s must be a positive number"):
            run_program("pass", timeout_s=bad)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=0)


# ---------------------------------------------------------------------------
# hostile programs
# ---------------------------------------------------------------------------


def test_an_infinite_loop_times_out_and_the_evaluator_goes_on():
    r, left = _run_marked("while True:\n    pass", timeout_s=1)
    assert r.status == "timeout" and "timed out after 1 s" in r.reason and r.returncode == -9
    assert left == [] and run_program("print('next')").stdout == "next\n"


def test_a_sleeping_program_times_out_too():
    r = run_program("import time\ntime.sleep(60)", timeout_s=0.5)
    assert r.status == "timeout"


@pytest.mark.parametrize("source", [
    "x = bytearray(10**11)",                                   # one huge allocation
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",  # growing until the limit
])
def test_a_memory_bomb_gets_memory_error(source):
    r = run_program(source, memory_mb=256)
    assert r.status == "failed" and r.reason == "MemoryError", r.stderr
    assert run_program("print(sum(range(10)))").stdout == "45\n"


@linux_only
def test_a_fork_bomb_is_stopped_at_the_process_cap_without_the_guard():
    # bounded (2**10 processes at most if nothing stopped it), so that a failure cannot take the machine down
    bomb = ("import os, time\nfor _ in range(10):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
            "time.sleep(30)")
    r, left = _run_marked(bomb, guard=False, max_processes=8, timeout_s=20)
    assert r.status == "failed" and r.reason == "process limit: more than 8 processes"
    assert left == []
    assert run_program("print('alive')").stdout == "alive\n"


def test_the_guard_refuses_new_processes_signals_and_ctypes_calls():
    for source, event in [("import os\nos.fork()", "os.fork"),
                          ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
                          ("import os\nos.system('true')", "os.system"),
                          ("import os, signal\nos.kill(1, signal.SIGTERM)", "os.kill"),
                          ("import ctypes\nctypes.CDLL(None).fork()", "ctypes.dlsym"),
                          ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
                           "resource.setrlimit")]:
        r = run_program(source)
        assert r.status == "failed" and r.reason == f"PermissionError: sandbox: {event} is not allowed here", source


@linux_only
def test_children_are_killed_with_the_program_even_when_they_escape_its_session():
    # a daemon (fork, setsid, fork again) outlives a main that ends normally
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
              "    os._exit(0)\ntime.sleep(0.3)\nprint('main done')")
    r, left = _run_marked(daemon, guard=False)
    assert r.status == "passed" and r.stdout == "main done\n" and left == []
    # a child in a session of its own, alive when the program times out
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(60)"
    r, left = _run_marked(escape, guard=False, timeout_s=1)
    assert r.status == "timeout" and left == []


def test_files_outside_the_folder_cannot_be_deleted_renamed_or_written(tmp_path):
    victim_dir = tmp_path / "precious"
    victim_dir.mkdir()
    victim = victim_dir / "data.txt"
    victim.write_text("keep me")
    attacks = [f"import os\nos.remove({str(victim)!r})",
               f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
               f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
               f"open({str(victim)!r}, 'w').write('overwritten')",
               f"import os\nos.chmod({str(victim)!r}, 0)",
               f"import os\nos.truncate({str(victim)!r}, 0)",
               f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
               f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('through a link')",
               f"import os\nos.chdir({str(victim_dir)!r})\nopen('new.txt', 'w')"]
    for source in attacks:
        r = run_program(source)
        assert r.status == "failed" and r.reason.startswith("PermissionError: sandbox:"), (source, r.stderr)
    assert victim.read_text() == "keep me" and sorted(p.name for p in victim_dir.iterdir()) == ["data.txt"]
    # inside its own folder the program may do all of that
    inside = ("import os, shutil\nos.mkdir('d')\nopen('d/f', 'w').write('x')\nos.rename('d/f', 'd/g')\n"
              "os.symlink('d/g', 'link')\nopen('link').read()\nshutil.rmtree('d')\nos.remove('link')\nprint('ok')")
    assert run_program(inside).stdout == "ok\n"


def test_huge_output_is_cut_off_and_only_its_tail_kept():
    r, left = _run_marked("while True:\n    print('x' * 999)", max_output_bytes=100_000, tail_bytes=5000)
    assert r.status == "failed" and r.reason == "output limit: wrote more than 100000 bytes"
    assert r.output_bytes > 100_000 and len(r.stdout) == 5000 and set(r.stdout) == {"x", "\n"} and left == []


def test_a_huge_file_is_refused_at_the_file_size_cap():
    r = run_program("with open('big', 'wb') as f:\n    f.write(b'0' * (64 * 2**20))", file_size_mb=8)
    assert r.status == "failed" and "File too large" in r.reason


@linux_only
def test_the_program_ends_even_if_the_evaluator_dies(tmp_path):
    # the evaluator is killed mid-run; the sandbox's supervisor ends the program on its own (timeout + 2 s)
    import subprocess
    import time

    token = uuid.uuid4().hex
    code = ("from llm.eval.sandbox import run_program\n"
            f"run_program('import time\\ntime.sleep(60)', timeout_s=1, env={{'SANDBOX_TEST_TOKEN': '{token}'}})")
    evaluator = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):  # wait until the program runs
        if _processes_with(token):
            break
        time.sleep(0.05)
    assert _processes_with(token), "the sandboxed program never started"
    evaluator.kill()
    evaluator.wait()
    for _ in range(100):  # the backstop fires 3 s after the start
        if not _processes_with(token):
            break
        time.sleep(0.1)
    assert _processes_with(token) == []


def test_many_programs_run_in_parallel_in_order_and_one_bad_program_harms_none():
    sources = [f"print({i})" for i in range(12)]
    sources[3] = "while True:\n    pass"
    sources[7] = "x = bytearray(10**11)"
    results = run_programs(sources, workers=2, timeout_s=1)
    assert [r.status for r in results] == ["passed"] * 3 + ["timeout"] + ["passed"] * 3 + ["failed"] + ["passed"] * 4
    assert [r.stdout for i, r in enumerate(results) if i not in (3, 7)] == [f"{i}\n" for i in range(12) if i not in (3, 7)]


# ---------------------------------------------------------------------------
# the checkers' programs
# ---------------------------------------------------------------------------

_HE_DOC = {"task_id": "HumanEval/x", "prompt": "def add(a, b):\n    \"\"\"Adds.\"\"\"\n",
           "canonical_solution": "    return a + b\n", "entry_point": "add",
           "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"}
_MBPP_DOC = {"task_id": 1, "text": "Add two numbers.", "code": "def add(a, b):\r\n    return a + b",
             "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
             "test_setup_code": "", "challenge_test_list": []}


def test_humaneval_program_is_assembled_as_the_checker_does():
    expected = ("def add(a, b):\n    \"\"\"Adds.\"\"\"\n    return a + b\n\n\n\ndef check(candidate):\n"
                "    assert candidate(2, 3) == 5\n\ncheck(add)")
    assert humaneval_program(_HE_DOC, "    return a + b\n") == expected


def test_mbpp_program_is_the_code_then_the_asserts_with_setup_code_when_there_is_some():
    assert mbpp_program(_MBPP_DOC, "CODE") == "CODE\nassert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0"
    doc = dict(_MBPP_DOC, test_setup_code="x = 1")
    assert mbpp_program(doc, "CODE") == "CODE\nx = 1\nassert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0"
    assert mbpp_program(doc, "CODE", setup=False) == mbpp_program(_MBPP_DOC, "CODE")


def test_check_completions_gives_one_result_per_sample():
    results = check_completions([_HE_DOC, _HE_DOC], [["    return a + b\n", "    return a - b\n", "    pass\n"],
                                                     ["    return b + a\n"]])
    assert [[r.passed for r in rs] for rs in results] == [[True, False, False], [True]]
    mbpp = check_completions([_MBPP_DOC], [[_MBPP_DOC["code"], "def add(a, b):\n    return 3",
                                            "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n"
                                            "    raise SystemExit('main blocks do not run in the checker')"]],
                             program=mbpp_program)
    assert [r.passed for r in mbpp[0]] == [True, False, True]
    with pytest.raises(ValueError, match="2 documents but 1 lists"):
        check_completions([_HE_DOC, _HE_DOC], [["x"]])


def test_a_completion_that_exits_early_fails_as_in_the_checker():
    r = check_programs([humaneval_program(_HE_DOC, "    return a + b\nimport sys\nsys.exit(0)\n")])[0]
    assert r.status == "failed" and "exit()" in r.reason


# ---------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------


def test_pass_at_k_equals_the_combinatorial_definition_for_all_small_cases():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 2000, 37, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(200, 0, 10) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction that passed


@pytest.mark.parametrize("args, message", [((5, 6, 1), "0 <= c <= n"), ((5, -1, 1), "0 <= c <= n"),
                                           ((5, 2, 0), "1 <= k <= n"), ((5, 2, 6), "1 <= k <= n")])
def test_pass_at_k_refuses_impossible_counts(args, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(*args)
    with pytest.raises(TypeError, match="must be an integer"):
        pass_at_k(5.0, 2, 1)


# ---------------------------------------------------------------------------
# the real benchmarks: reference solutions pass, wrong ones fail
# ---------------------------------------------------------------------------


def _benchmark_or_skip(task):
    from llm.eval.datasets import DatasetUnavailable, load_docs

    try:
        return load_docs(task, log=lambda *a: None)
    except DatasetUnavailable as e:
        pytest.skip(f"benchmark data not reachable here: {e}")


@pytest.mark.slow
def test_every_reference_solution_passes_all_164_humaneval_and_500_mbpp_problems():
    humaneval, mbpp = _benchmark_or_skip("humaneval"), _benchmark_or_skip("mbpp")
    programs = ([humaneval_program(d, d["canonical_solution"]) for d in humaneval]
                + [mbpp_program(d, d["code"]) for d in mbpp])
    # a generous timeout: MBPP 123 (amicable numbers below 10,000) takes 2-7 s on a busy 2-core machine,
    # beyond the checkers' 3 s; the timeout is not what this test is about
    results = check_programs(programs, timeout_s=60, workers=2)
    ids = [d["task_id"] for d in humaneval] + [f"MBPP/{d['task_id']}" for d in mbpp]
    failures = [(i, r.status, r.reason) for i, r in zip(ids, results) if not r.passed]
    assert failures == [] and len(results) == 664


@pytest.mark.slow
def test_wrong_completions_fail_on_the_real_benchmarks():
    humaneval, mbpp = _benchmark_or_skip("humaneval")[:20], _benchmark_or_skip("mbpp")[:20]
    # HumanEval: another problem's reference body; MBPP: another problem's reference code
    programs = ([humaneval_program(d, humaneval[(i + 1) % 20]["canonical_solution"]) for i, d in enumerate(humaneval)]
                + [mbpp_program(d, mbpp[(i + 1) % 20]["code"]) for i, d in enumerate(mbpp)])
    assert [r.status for r in check_programs(programs, workers=2)] == ["failed"] * 40
    # MBPP 367 needs its test_setup_code; without it (as the harness runs it) the reference fails too
    d367 = next(d for d in _benchmark_or_skip("mbpp") if d["task_id"] == 367)
    with_setup, without = check_programs([mbpp_program(d367, d367["code"]),
                                          mbpp_program(d367, d367["code"], setup=False)])
    assert with_setup.passed and without.status == "failed" and "NameError" in without.reason
