"""Pipeline schedules and stage partitioning, without MPI.

The schedules are plain instruction lists: a simulator executes all stages'
lists together with blocking sends and receives. The properties are checked
twice: by ``simulate`` and by counting directly on the lists here. The
GPT stage modules, chained in one process, must compute what the whole model
computes.
"""

import itertools

import numpy as np
import pytest

import autograd
import nn
from llm.model import GPT, GPTConfig, get_preset
from parallel import Communicator, make_grid
from parallel import schedule as sch
from llm.trainer import Job, stage_layout
from parallel.pipeline import (check_counts, gather_state, merge_optimizer_states, parse_counts, partition_balanced,
                               stage_optimizer_state)
from parallel.pipeline_exec import PipelineExecutor, split_rows

CASES = [(kind, p, k * p) for kind in sch.SCHEDULES for p in (2, 4) for k in (1, 2, 4)]


def peak_from_list(lst):
    live = peak = 0
    for op, _ in lst:
        if op == sch.FORWARD:
            live += 1
            peak = max(peak, live)
        elif op == sch.BACKWARD:
            live -= 1
    return peak


@pytest.mark.parametrize("kind,p,m", CASES)
def test_schedule_runs_and_holds_the_bound(kind, p, m):
    lists = sch.build_schedule(kind, p, m)
    result = sch.simulate(lists)  # raises on an unmatched message, a bad order or a deadlock
    assert result.messages == 2 * (p - 1) * m  # one activation and one gradient per link and micro-batch
    for s, lst in enumerate(lists):
        # every message has its partner on the neighbour, in the same order on both sides
        if s < p - 1:
            sent = [i for op, i in lst if op == sch.SEND_FWD]
            assert sent == [i for op, i in lists[s + 1] if op == sch.RECV_FWD] == list(range(m))
            got = [i for op, i in lst if op == sch.RECV_BWD]
            assert got == [i for op, i in lists[s + 1] if op == sch.SEND_BWD]
            assert sorted(got) == list(range(m))
        else:
            assert not any(op in (sch.SEND_FWD, sch.RECV_BWD) for op, _ in lst)
        if s == 0:
            assert not any(op in (sch.RECV_FWD, sch.SEND_BWD) for op, _ in lst)
        for i in range(m):  # each micro-batch: (recv) forward (send) ... (recv) backward (send), in that order
            where = {op: lst.index((op, i)) for op in sch.OPS if (op, i) in lst}
            assert where[sch.FORWARD] < where[sch.BACKWARD]
            if s > 0:
                assert where[sch.RECV_FWD] < where[sch.FORWARD] and where[sch.BACKWARD] < where[sch.SEND_BWD]
            if s < p - 1:
                assert where[sch.FORWARD] < where[sch.SEND_FWD] and where[sch.RECV_BWD] < where[sch.BACKWARD]
        peak = peak_from_list(lst)
        assert result.peak_activations[s] == peak
        if kind == "gpipe":
            assert peak == m
        else:
            assert peak == min(m, p - s) <= p - s
        assert peak == sch.peak_activations_bound(kind, s, p, m)


@pytest.mark.parametrize("kind,p,m", CASES)
def test_timed_bubble_is_the_theoretical_one(kind, p, m):
    for f, b in [(1.0, 2.0), (1.0, 1.0)]:
        tl = sch.timeline(kind, p, m, forward_time=f, backward_time=b)
        assert tl.makespan == pytest.approx((m + p - 1) * (f + b))
        assert tl.bubble == pytest.approx((p - 1) / (m + p - 1)) == pytest.approx(sch.bubble_fraction(p, m))


def test_timeline_with_unequal_stages():
    # stage 1 twice as slow: it is the bottleneck; GPipe ends at 1 (stage 0's first forward) + 4 m + 1
    m = 4
    tl = sch.timeline("gpipe", 2, m, forward_time=[1, 2], backward_time=[1, 2])
    assert tl.makespan == 4 * m + 2
    assert tl.busy == [2 * m, 4 * m]
    with pytest.raises(ValueError, match="forward_time has 3 entries for 2 stages"):
        sch.timeline("gpipe", 2, m, forward_time=[1, 1, 1])


def test_1f1b_order():
    # stage 0 of 4: three warm-up forwards, then alternating, then the cool-down backwards
    F, B = sch.FORWARD, sch.BACKWARD
    assert sch.compute_order("1f1b", 0, 4, 6) == [(F, 0), (F, 1), (F, 2), (F, 3), (B, 0), (F, 4), (B, 1), (F, 5),
                                                  (B, 2), (B, 3), (B, 4), (B, 5)]
    assert sch.compute_order("1f1b", 3, 4, 2) == [(F, 0), (B, 0), (F, 1), (B, 1)]
    assert sch.compute_order("gpipe", 1, 2, 2) == [(F, 0), (F, 1), (B, 0), (B, 1)]


def naive(kind, p, m):
    """Receive right before each computation, send right after it: what a first attempt writes."""
    lists = []
    for s in range(p):
        lst = []
        for op, i in sch.compute_order(kind, s, p, m):
            if op == sch.FORWARD:
                lst += ([(sch.RECV_FWD, i)] if s > 0 else []) + [(op, i)] + ([(sch.SEND_FWD, i)] if s < p - 1 else [])
            else:
                lst += ([(sch.RECV_BWD, i)] if s < p - 1 else []) + [(op, i)] + ([(sch.SEND_BWD, i)] if s > 0 else [])
        lists.append(lst)
    return lists


def test_simulator_finds_the_naive_1f1b_deadlock():
    # stage 0 sends activation 1 while stage 1 sends gradient 0: both block under rendezvous semantics
    pattern = "deadlock.*stage 0 at \\('send_fwd', 1\\).*stage 1 at \\('send_bwd', 0\\)"
    with pytest.raises(sch.ScheduleError, match=pattern):
        sch.simulate(naive("1f1b", 2, 2))
    sch.simulate(naive("gpipe", 2, 2))  # GPipe's naive order happens to be safe


@pytest.mark.parametrize("mutate,match", [
    (lambda L: L[1].remove((sch.RECV_FWD, 1)), "does not match"),
    (lambda L: L[0].remove((sch.BACKWARD, 0)), "never runs backward"),
    (lambda L: L[1].insert(0, L[1].pop(L[1].index((sch.FORWARD, 0)))), "before its activation"),
    (lambda L: L[0].insert(0, (sch.BACKWARD, 5)), "outside"),
    (lambda L: L[0].append((sch.FORWARD, 0)), "twice"),
    (lambda L: L[0].append((sch.SEND_BWD, 0)), "does not exist"),
    (lambda L: L[0].insert(0, L[0].pop(L[0].index((sch.BACKWARD, 1)))), "before its forward"),
    (lambda L: L[1].insert(L[1].index((sch.BACKWARD, 0)), L[1].pop(L[1].index((sch.SEND_BWD, 0)))),
     "sends the input gradient of micro-batch 0 before computing it"),
], ids=["missing-recv", "missing-backward", "forward-before-recv", "bad-micro-batch", "duplicate", "no-such-peer",
        "backward-before-forward", "send-before-compute"])
def test_simulator_rejects_broken_lists(mutate, match):
    lists = sch.build_schedule("1f1b", 2, 2)
    mutate(lists)
    with pytest.raises(sch.ScheduleError, match=match):
        sch.simulate(lists, n_micro=2)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        sch.build_schedule("zb", 2, 2)
    with pytest.raises(ValueError, match="n_micro must be a positive integer"):
        sch.build_schedule("1f1b", 2, 0)
    with pytest.raises(ValueError, match="stage 2 does not exist"):
        sch.stage_schedule("gpipe", 2, 2, 4)


# ---------------------------------------------------------------------------
# partitioning
# ---------------------------------------------------------------------------


def brute_force_min_max(costs, p):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_partition_is_optimal(seed):
    g = np.random.default_rng(seed)
    costs = [int(c) for c in g.integers(1, 20, size=int(g.integers(4, 9)))]
    for p in range(1, min(4, len(costs)) + 1):
        counts = partition_balanced(costs, p)
        assert len(counts) == p and all(c >= 1 for c in counts) and sum(counts) == len(costs)
        bounds = np.cumsum([0] + counts)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert worst == brute_force_min_max(costs, p)


def test_stage_layout_balances_by_parameter_count():
    c = GPTConfig(vocab_size=64, block_size=8, n_layer=8, n_head=2, n_embd=16)
    assert stage_layout(c, 2) == [range(0, 4), range(4, 8)]
    assert stage_layout(c, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # a head as large as ~20 blocks: the last stage gets a single block
    big_vocab = GPTConfig(vocab_size=16 * 1024, block_size=8, n_layer=8, n_head=2, n_embd=16)
    assert stage_layout(big_vocab, 2) == [range(0, 7), range(7, 8)]
    assert stage_layout(get_preset("tiny", vocab_size=256, n_layer=5), 2) == [range(0, 3), range(3, 5)]


def test_user_counts_and_their_errors():
    c = GPTConfig(vocab_size=64, block_size=8, n_layer=4, n_head=2, n_embd=16)
    assert stage_layout(c, 2, counts=[3, 1]) == [range(0, 3), range(3, 4)]
    assert parse_counts("1,3") == [1, 3] and parse_counts(None) is None and parse_counts("") is None
    with pytest.raises(ValueError, match=r"\[3, 2\] add up to 5 blocks, but the model has n_layer=4"):
        stage_layout(c, 2, counts=[3, 2])
    with pytest.raises(ValueError, match=r"\[4\] give 1 stage\(s\), but the pipeline has 2"):
        check_counts([4], 4, 2)
    with pytest.raises(ValueError, match=r"\[4, 0\].*>= 1 of blocks, got \[0\]"):
        check_counts([4, 0], 4, 2)
    with pytest.raises(ValueError, match=r"'2;2' must be comma-separated"):
        parse_counts("2;2")
    with pytest.raises(ValueError, match="cannot split n_layer=4 blocks into 8"):
        stage_layout(c, 8)


# ---------------------------------------------------------------------------
# the stage modules, in one process
# ---------------------------------------------------------------------------


def small_config(tie=True, **kw):
    return GPTConfig(**{**dict(vocab_size=24, block_size=6, n_layer=4, n_head=2, n_embd=8, tie_embeddings=tie), **kw})


LLAMA = dict(mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, n_head=4, n_kv_head=2, mlp_hidden_dim=12)


@pytest.mark.parametrize("tie,kw", [(True, {}), (False, {}), (False, LLAMA)], ids=["tied", "untied", "llama"])
def test_stages_chained_equal_the_model(tie, kw, rng):
    """Stages run one after the other (activation and gradient handed over by hand) give the model's loss and grads."""
    c = small_config(tie, **kw)
    x = rng.integers(0, c.vocab_size, size=(3, c.block_size))
    y = rng.integers(0, c.vocab_size, size=(3, c.block_size))
    model = GPT(c, generator=np.random.default_rng(0), dtype=np.float64)
    _, loss = model(x, targets=y)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}

    layout = stage_layout(c, 3, counts=[1, 2, 1])
    stages = [GPT(c, generator=np.random.default_rng(0), dtype=np.float64).pipeline_stage(s, layout) for s in range(3)]
    names = [n for st in stages for n in st.state_dict()]
    full = list(model.state_dict())
    assert [n for n in dict.fromkeys(names)] == full  # stage by stage: the full model's names, in its order
    assert ("wte.weight" in stages[2].state_dict()) == tie and stages[2].holds_tied_copy == tie
    assert stages[2].wte.weight is not stages[0].wte.weight if tie else True

    inputs, outputs = [], []
    h = x
    for st in stages:
        inp = h if st.is_first else autograd.Tensor(h.data, requires_grad=True)
        out = st(inp, targets=y)[1] if st.is_last else st(inp)  # the last stage: (logits, loss)
        inputs.append(inp)
        outputs.append(out)
        h = out
    assert float(outputs[-1].data) == pytest.approx(float(loss.data), rel=1e-12)
    grad = None
    for st, inp, out in zip(reversed(stages), reversed(inputs), reversed(outputs)):
        out.backward(grad)
        grad = None if st.is_first else inp.grad
    got = {}
    for st in stages:
        for n, p in st.named_parameters():
            got[n] = p.grad if n not in got else got[n] + p.grad  # a tied wte: both copies' gradients add up
    assert set(got) == set(ref)
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-10, atol=1e-14, err_msg=n)


@pytest.mark.parametrize("schedule", sch.SCHEDULES)
def test_executor_one_stage_accumulates_micro_batches(schedule, rng):
    """World size 1 (no MPI): one stage, 3 micro-batches, equals the whole batch at once."""
    c = small_config()
    x = rng.integers(0, c.vocab_size, size=(6, c.block_size))
    y = rng.integers(0, c.vocab_size, size=(6, c.block_size))
    y[0] = -100
    model = GPT(c, generator=np.random.default_rng(0), dtype=np.float64)
    _, loss = model(x, targets=y)
    loss.backward()
    grid = make_grid(Communicator(), 1, 1)
    stage = GPT(c, generator=np.random.default_rng(0), dtype=np.float64)  # the whole model: the one-stage case
    pipe = PipelineExecutor(stage, grid, n_micro=3, schedule=schedule)
    job = Job()
    result = pipe.step(split_rows({"input_ids": x, "labels": y}, 3), job.loss, job.inputs, job.count)
    assert result.loss == pytest.approx(float(loss.data), rel=1e-12)
    assert result.peak_activations == (3 if schedule == "gpipe" else 1)
    assert result.n_tokens == 5 * c.block_size
    for n, p in stage.named_parameters():
        np.testing.assert_allclose(p.grad, dict(model.named_parameters())[n].grad, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="cannot be split into 4 equal micro-batches"):
        split_rows({"input_ids": x, "labels": y}, 4)


def test_state_moves_between_layouts():
    """gather (one process) -> cut into another layout's stages -> merge back: the same state."""
    c = small_config()
    model = GPT(c, generator=np.random.default_rng(0), dtype=np.float64)
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, 0.1), lr=1e-2)
    _, loss = model(np.zeros((1, 4), dtype=np.int64), targets=np.ones((1, 4), dtype=np.int64))
    loss.backward()
    opt.step()
    grid = make_grid(Communicator(), 1, 1)
    full_state, full_opt = gather_state(grid, model, opt)
    assert list(full_state) == list(model.state_dict())

    layout = stage_layout(c, 2)
    parts, opts = [], []
    for s in range(2):
        st = GPT(c, generator=np.random.default_rng(1), dtype=np.float64).pipeline_stage(s, layout)
        st.load_state_dict({n: full_state[n] for n in st.state_dict()})
        o = nn.optim.AdamW(nn.optim.param_groups_for_gpt(st, 0.1), lr=1e-2)
        o.load_state_dict(stage_optimizer_state(st, full_opt))
        parts.append(st)
        opts.append(o.state_dict())
    np.testing.assert_array_equal(parts[1].wte.weight.data, model.wte.weight.data)  # the tied copy
    merged = merge_optimizer_states(opts, order=list(full_state))
    assert merged["param_groups"] == full_opt["param_groups"]
    assert set(merged["state"]) == set(full_opt["state"])
    for n, entry in full_opt["state"].items():
        np.testing.assert_array_equal(merged["state"][n]["exp_avg_sq"], entry["exp_avg_sq"])


def test_executor_names_what_a_stage_module_lacks():
    grid = make_grid(Communicator(), 1, 1)
    with pytest.raises(TypeError, match="lacks stage, n_stages, is_first"):
        PipelineExecutor(nn.Linear(2, 2), grid, n_micro=1)
