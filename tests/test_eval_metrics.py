"""Metrics and standard errors of llm.eval.metrics against independent computations."""

import math
import random
import statistics

import numpy as np
import pytest

from llm.eval import metrics as M
from llm.eval.tasks.gsm8k import FLEXIBLE, IGNORE


def test_mean_stderr_is_sample_stddev_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert M.mean(values) == pytest.approx(5 / 7)
    assert M.mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), rel=1e-12)
    assert M.mean_stderr([1.0]) is None  # the harness reports "N/A" for a single value


def _harness_bootstrap(values, statistic, iters):
    """The harness's bootstrap written out with Python's own random module (what bootstrap_stderr reproduces)."""
    chunk = min(1000, iters)
    res = []
    for i in range(iters // chunk):
        rnd = random.Random(i)
        for _ in range(chunk):
            res.append(statistic(rnd.choices(values, k=len(values))))
    return statistics.stdev(res)


@pytest.mark.parametrize("n,iters", [(7, 2000), (50, 1500), (3, 300)])
def test_bootstrap_stderr_draws_the_harness_resamples(n, iters):
    rng = np.random.default_rng(n)
    values = list(-rng.gamma(2.0, 1.5, size=n))  # log-likelihoods
    expected = _harness_bootstrap(values, lambda xs: math.exp(-sum(xs) / len(xs)), iters)
    got = M.bootstrap_stderr(M.perplexity_rows, values, iters)
    assert got == pytest.approx(expected, rel=1e-9)


def test_bootstrap_rows_in_blocks_match_one_block():
    values = list(np.linspace(-3, -0.5, 2001))  # 2001 values: 1000 resamples need two blocks of rows
    one = M.bootstrap_stderr(M.perplexity_rows, values, 1000)
    expected = _harness_bootstrap(values, lambda xs: math.exp(-sum(xs) / len(xs)), 1000)
    assert one == pytest.approx(expected, rel=1e-9)
    assert M.bootstrap_stderr(M.perplexity_rows, [-1.0], 1000) is None


def test_perplexities_and_bits_per_byte_by_hand():
    docs = ["hello world", "a b  c\nd", "né"]
    lls = [-20.0, -13.5, -6.25]
    words = [len(__import__("re").split(r"\s+", d)) for d in docs]
    nbytes = [len(d.encode("utf-8")) for d in docs]
    assert words == [2, 4, 1] and nbytes == [11, 8, 3]
    assert [M.count_words(d) for d in docs] == words
    assert [M.count_bytes(d) for d in docs] == nbytes
    total = sum(lls)
    assert M.weighted_perplexity(list(zip(lls, words))) == pytest.approx(math.exp(-total / 7))
    assert M.weighted_perplexity(list(zip(lls, nbytes))) == pytest.approx(math.exp(-total / 22))
    assert M.bits_per_byte(list(zip(lls, nbytes))) == pytest.approx(-total / 22 / math.log(2))
    # summed over documents first, not averaged per document
    per_doc = statistics.mean(math.exp(-ll / w) for ll, w in zip(lls, words))
    assert M.weighted_perplexity(list(zip(lls, words))) != pytest.approx(per_doc)
    assert M.perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))


def test_group_weighted_mean_and_pooled_stderr_from_raw_data():
    groups = [[1, 0, 1, 1], [0, 0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    sizes = [len(g) for g in groups]
    means = [statistics.mean(g) for g in groups]
    ses = [M.mean_stderr(g) for g in groups]
    allv = [x for g in groups for x in g]
    assert M.weighted_mean(means, sizes) == pytest.approx(statistics.mean(allv))
    pooled_var = sum((len(g) - 1) * statistics.variance(g) for g in groups) / (len(allv) - len(groups))
    assert M.pooled_stderr(ses, sizes) == pytest.approx(math.sqrt(pooled_var / len(allv)), rel=1e-12)
    assert M.pooled_stderr([0.1, None], [3, 4]) is None


def test_acc_and_acc_norm_disagree_on_a_crafted_question():
    # the long answer has the lower total log-likelihood but the higher per-character one
    choices = ["no", "a considerably longer answer"]
    lls = [-3.0, -10.0]
    assert M.multiple_choice_scores(lls, choices, gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert M.multiple_choice_scores(lls, choices, gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    # ties go to the first choice, as numpy's argmax
    assert M.multiple_choice_scores([-1.0, -1.0], ["ab", "cd"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}


STRICT = "#### (\\-?[0-9\\.\\,]+)"


@pytest.mark.parametrize("completion,strict,flexible", [
    (" She has 16 - 3 = 13 eggs.\n#### 13", "13", "13"),
    (" Total is $1,000.\n#### 1,000\n\nQuestion", "1,000", "1,000"),
    (" The answer is 42.", M.INVALID, "42."),
    (" 3 apples and 4 pears make 7", M.INVALID, "7"),
    (" #### -5", "-5", "-5"),
    (" nothing numeric here", M.INVALID, M.INVALID),
])
def test_gsm8k_extraction(completion, strict, flexible):
    assert M.regex_extract(completion, STRICT) == strict
    assert M.regex_extract(completion, FLEXIBLE, group_select=-1) == flexible


@pytest.mark.parametrize("prediction,gold,match", [
    ("13", "16 - 3 = 13\n#### 13", 1.0),
    ("1,000", "so $1000 in all\n#### 1000", 1.0),       # commas removed from both
    ("$18", "#### 18", 1.0),                              # "$" removed
    ("42.", "#### 42", 1.0),                              # a trailing "." removed
    ("42.5", "#### 42", 0.0),
    (M.INVALID, "#### 7", 0.0),
    ("ABC", "#### abc", 1.0),                             # case ignored
])
def test_gsm8k_exact_match_with_the_harness_ignore_patterns(prediction, gold, match):
    assert M.exact_match(prediction, gold, IGNORE, ignore_case=True) == match


def test_exact_match_options():
    assert M.exact_match("a,b!", "ab", ignore_punctuation=True) == 1.0
    assert M.exact_match("a1", "a2", ignore_numbers=True) == 1.0
    assert M.exact_match("A", "a") == 0.0
