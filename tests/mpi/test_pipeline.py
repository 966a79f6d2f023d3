"""Pipeline parallelism under mpirun: every stage's gradients equal one process's on the whole batch.

Every rank builds the same float64 GPT from the same seed as a reference and
computes its loss and gradients on the whole global batch locally; each stage
compares its own parameters' gradients with the reference's of the same names.
At -n 2 the pipeline has 2 stages; at -n 4, 4 stages, or 2 stages x 2
data-parallel replicas. Float64 throughout: the only differences are rounding
(sums in another order), so 1e-10 relative.
"""

import hashlib

import numpy as np
import pytest

import nn
from llm.model import GPT, GPTConfig
from llm.trainer import Job, stage_layout
from parallel import make_grid
from parallel.pipeline_exec import PipelineExecutor, split_rows
from parallel.schedule import peak_activations_bound

JOB = Job()  # next-token prediction: inputs, count and loss of a batch {"input_ids", "labels"}

pytestmark = pytest.mark.mpi

TOL = 1e-10
LAYOUTS = [(1, 2), (1, 4), (2, 2), (2, 1)]  # (dp, pp); each runs where dp * pp == world size


def tiny_config(tie=True, **kw):
    base = dict(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16, tie_embeddings=tie)
    base.update(kw)
    return GPTConfig(**base)


def global_batch(config, rows, seed=0, T=None):
    g = np.random.default_rng(1000 + seed)
    T = config.block_size if T is None else T
    x = g.integers(0, config.vocab_size, size=(rows, T))
    y = g.integers(0, config.vocab_size, size=(rows, T))
    y[0, :2] = -100  # some ignored targets: the normaliser is the global count of the rest
    return x, y


def reference_grads(config, x, y, seed=0):
    model = GPT(config, generator=np.random.default_rng(seed), dtype=np.float64)
    _, loss = model(x, targets=y)
    loss.backward()
    return float(loss.data), {n: p.grad for n, p in model.named_parameters()}


def build_stage(config, stage, pp, counts=None, generator=None, dtype=np.float32):
    """Stage ``stage`` of ``pp`` of the GPT ``config`` with ``generator``'s weights (the whole model when pp == 1)."""
    model = GPT(config, generator=generator, dtype=dtype)
    return model.pipeline_stage(stage, stage_layout(config, pp, counts)) if pp > 1 else model


def run_step(pipe, x, y, m):
    """One executor step over this replica's rows ``(x, y)`` in ``m`` micro-batches."""
    return pipe.step(split_rows({"input_ids": x, "labels": y}, m), JOB.loss, JOB.inputs, JOB.count)


def rel_diff(a, b):
    d = float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)
    return d if d == d else float("inf")


def local_rows(grid, x, y):
    n = len(x) // grid.dp
    r = grid.dp_rank
    return x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]


def tied_digest(stage):
    if not hasattr(stage, "wte") or stage.wte is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(stage.wte.weight.data).tobytes()).hexdigest()


def check_pipeline_grads(comm, assert_all_ranks, dp, pp, m, schedule, config, rows_per_micro=1, T=None):
    grid = make_grid(comm, dp, pp)
    x, y = global_batch(config, dp * m * rows_per_micro, T=T)
    ref_loss, ref = reference_grads(config, x, y)
    stage = build_stage(config, grid.stage, pp, generator=np.random.default_rng(0), dtype=np.float64)
    pipe = PipelineExecutor(stage, grid, n_micro=m, schedule=schedule)
    xl, yl = local_rows(grid, x, y)
    result = run_step(pipe, xl, yl, m)
    tag = f"dp={dp} pp={pp} m={m} {schedule}"
    assert_all_ranks(comm, abs(result.loss - ref_loss) <= TOL * abs(ref_loss),
                     f"{tag}: loss {result.loss!r} vs no pipelining {ref_loss!r}")
    names = [n for n, _ in stage.named_parameters()]
    bad = [f"{n}: {rel_diff(p.grad, ref[n]):.2e}" for n, p in stage.named_parameters()
           if p.grad is None or rel_diff(p.grad, ref[n]) > TOL]
    assert_all_ranks(comm, names and not bad, f"{tag}: stage {grid.stage} gradients differ: {bad}")
    bound = peak_activations_bound(schedule, grid.stage, pp, m)
    assert_all_ranks(comm, result.peak_activations == bound,
                     f"{tag}: stage {grid.stage} held {result.peak_activations} micro-batches, schedule says {bound}")
    return grid, stage, pipe


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("k", [1, 2, 4], ids=["m=p", "m=2p", "m=4p"])
@pytest.mark.parametrize("dp,pp", [(1, 2), (1, 4), (2, 2)], ids=["pp2", "pp4", "dp2xpp2"])
def test_pipeline_equals_no_pipelining(comm, assert_all_ranks, dp, pp, k, schedule):
    if dp * pp != comm.size:
        pytest.skip(f"needs {dp * pp} ranks")
    grid, stage, _ = check_pipeline_grads(comm, assert_all_ranks, dp, pp, k * pp, schedule, tiny_config())
    # the tied table: the first and the last stage hold bitwise equal copies with equal gradients
    digests = [d for d in comm.allgather(tied_digest(stage)) if d is not None]
    assert_all_ranks(comm, len(digests) == (2 * dp if pp > 1 else dp) and len(set(digests)) == 1,
                     f"the copies of wte differ across stages: {digests}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_untied_head_and_user_counts(comm, assert_all_ranks, schedule):
    """An untied head (lm_head on the last stage, no wte copy) and uneven blocks per stage."""
    pp = comm.size
    config = tiny_config(tie=False, n_layer=pp + 1)
    grid = make_grid(comm, 1, pp)
    x, y = global_batch(config, 2 * pp)
    ref_loss, ref = reference_grads(config, x, y)
    counts = [2] + [1] * (pp - 1)
    stage = build_stage(config, grid.stage, pp, counts=counts, generator=np.random.default_rng(0), dtype=np.float64)
    result = run_step(PipelineExecutor(stage, grid, n_micro=2 * pp, schedule=schedule), x, y, 2 * pp)
    have = {n for n, _ in stage.named_parameters()}
    expect_wte = grid.stage == 0
    assert_all_ranks(comm, ("wte.weight" in have) == expect_wte and ("lm_head.weight" in have) == (grid.stage == pp - 1)
                     and len(stage.h) == counts[grid.stage], f"stage {grid.stage} holds {sorted(have)}")
    bad = [n for n, p in stage.named_parameters() if rel_diff(p.grad, ref[n]) > TOL]
    assert_all_ranks(comm, abs(result.loss - ref_loss) <= TOL * abs(ref_loss) and not bad,
                     f"loss {result.loss} vs {ref_loss}; gradients differ: {bad}")


def test_megabyte_payloads(comm, assert_all_ranks):
    """Each activation and gradient message is 1 MiB (16 x 64 x 128 float64): far above the eager limit.

    Two ranks run it (the others wait), so that the float64 reference stays cheap at -n 4.
    """
    sub = comm.split(color=0 if comm.rank < 2 else None)
    error = ""
    if sub is not None:
        config = tiny_config(n_layer=2, n_embd=128, n_head=2, block_size=64, mlp_hidden_dim=8)
        try:
            check_pipeline_grads(sub, assert_all_ranks, 1, 2, 2, "1f1b", config, rows_per_micro=16)
        except AssertionError as e:  # raised on both ranks of sub together; report it on every rank below
            error = str(e)
        sub.free()
    assert_all_ranks(comm, not error, error)
    assert_all_ranks(comm, 16 * 64 * 128 * 8 >= 2 ** 20, "the payload is under 1 MiB")


@pytest.mark.parametrize("dp,pp", LAYOUTS)
def test_dp_pp_adamw_steps_equal_single_process(comm, assert_all_ranks, dp, pp):
    """A few AdamW steps with gradient clipping: every parameter and loss equals one process's (1e-10)."""
    if dp * pp != comm.size:
        pytest.skip(f"needs {dp * pp} ranks")
    config, steps, m = tiny_config(), 3, 2
    rows = dp * m

    ref_model = GPT(config, generator=np.random.default_rng(0), dtype=np.float64)
    ref_opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(ref_model, 0.1), lr=3e-2)
    ref_losses = []
    for step in range(steps):
        x, y = global_batch(config, rows, seed=step)
        _, loss = ref_model(x, targets=y)
        loss.backward()
        nn.optim.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(float(loss.data))

    grid = make_grid(comm, dp, pp)
    stage = build_stage(config, grid.stage, pp, generator=np.random.default_rng(0), dtype=np.float64)
    pipe = PipelineExecutor(stage, grid, n_micro=m, schedule="1f1b")
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(stage, 0.1), lr=3e-2)
    losses = []
    for step in range(steps):
        x, y = global_batch(config, rows, seed=step)
        result = run_step(pipe, *local_rows(grid, x, y), m)
        pipe.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
        losses.append(result.loss)
    ref_params = dict(ref_model.named_parameters())
    bad = [n for n, p in stage.named_parameters() if rel_diff(p.data, ref_params[n].data) > TOL]
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    assert_all_ranks(comm, not bad and loss_err <= TOL,
                     f"dp={dp} pp={pp}: losses {losses} vs {ref_losses}; parameters differ: {bad}")
    digests = [d for d in comm.allgather(tied_digest(stage)) if d is not None]
    assert_all_ranks(comm, len(set(digests)) == 1, f"the wte copies drifted apart: {digests}")


@pytest.mark.parametrize("dp,pp", LAYOUTS)
def test_eval_loss_equals_the_model(comm, assert_all_ranks, dp, pp):
    """Forward-only evaluation through the pipeline: the mean token loss of one process, on every rank."""
    if dp * pp != comm.size:
        pytest.skip(f"needs {dp * pp} ranks")
    config = tiny_config()
    grid = make_grid(comm, dp, pp)
    stage = build_stage(config, grid.stage, pp, generator=np.random.default_rng(0), dtype=np.float64)
    pipe = PipelineExecutor(stage, grid, n_micro=1)
    batches = [global_batch(config, rows, seed=k) for k, rows in enumerate([4, 3, 1])]  # uneven rows over dp
    model = GPT(config, generator=np.random.default_rng(0), dtype=np.float64)
    total = count = 0
    for x, y in batches:
        _, loss = model(x, targets=y)
        n = int((y != -100).sum())
        total, count = total + float(loss.data) * n, count + n
    total_got, count_got = pipe.eval_loss([{"input_ids": x, "labels": y} for x, y in batches], JOB.loss, JOB.inputs)
    got = total_got / count_got
    assert_all_ranks(comm, abs(got - total / count) <= TOL * total / count, f"eval loss {got} vs {total / count}")
    assert_all_ranks(comm, stage.training, "eval_loss left the stage in eval mode")
