"""What a training run shows and records: the metrics file, the progress display, and the speed gauges.

Metrics (``MetricsWriter``): one JSON object per line, appended and flushed as
they come; a resumed run first drops the lines after its checkpoint's step, so
the file reads as one uninterrupted run. The file gets ordinary permissions
(0644, like the checkpoint).

Progress (``Progress``): a tqdm bar (loss, tokens/s, MFU) when stderr is a
terminal; elsewhere (a log file, a pipe, mpirun's forwarding) one plain line
per log interval, since a bar's refreshes would fill a log with carriage
returns.

Speed (``measure_matmul_flops``, ``mfu``): the model FLOPs utilisation is
``flops_per_token * tokens_per_s`` over the float32 matrix-product rate of
this machine, timed on the training device at start-up and again at every
evaluation, the best rate counting (on a shared machine a busy neighbour
during one measurement would otherwise inflate every MFU that follows).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autograd import backend, kernels

from ..atomic import write_text_atomic
from ..model import GPTConfig

# ---------------------------------------------------------------------------
# the metrics file
# ---------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None  # NaN/inf are not JSON: null
    if isinstance(value, np.integer):
        return int(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line to ``path``, flushed at once (``tail -f`` shows it live).

    A fresh run (``resume_step=None``) starts the file empty. A resumed run keeps
    the lines whose ``"step"`` is at most ``resume_step`` (the checkpoint's) and
    drops the rest, which the interrupted run wrote after its last checkpoint.
    ``enabled=False`` (ranks other than 0) writes nothing.
    """

    def __init__(self, path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        keep = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                    keep.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))  # mode 0644, like every output
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict):
        """Append ``record`` as one line (NaN and inf become null)."""
        if self._f is None:
            return
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self):
        """Close the file (further writes are ignored)."""
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path) -> list[dict]:
    """The records of a metrics file, in order (a line cut short by a crash is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ---------------------------------------------------------------------------
# the progress display
# ---------------------------------------------------------------------------


class Progress:
    """Steps done, with loss, tokens/s and MFU: a tqdm bar on a terminal, a plain line per log interval elsewhere.

    ``enabled=False`` (other ranks, ``--no-progress``) shows nothing;
    ``interactive`` (default: whether stderr is a terminal) picks the form.
    ``write(text)`` prints a message without breaking the bar (to stdout).
    """

    def __init__(self, total: int, initial: int, enabled: bool = True, interactive: bool | None = None,
                 desc: str = "train"):
        self.enabled = enabled
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.total, self.desc = total, desc
        self.bar = None
        if enabled and self.interactive:
            self.bar = tqdm(total=total, initial=min(initial, total), desc=desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1):
        """Count ``n`` more steps."""
        if self.bar is not None:
            self.bar.update(n)

    def show(self, step: int, loss: float, tokens_per_s: float, mfu: float):
        """The figures of the last log interval: the bar's postfix, or one line on stderr."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{100 * mfu:.1f}%",
                                 refresh=False)
        else:
            print(f"{self.desc} step {step}/{self.total}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
                  f"MFU {100 * mfu:.1f}%", file=sys.stderr, flush=True)

    def write(self, text: str):
        """Print ``text`` on stdout (above the bar when there is one)."""
        if self.bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------


def matmul_size_for(config: GPTConfig) -> int:
    """The side of the square product that stands for the model's: 4 * n_embd (the MLP's width), in [256, 4096]."""
    n = 4 * config.n_embd
    return int(min(4096, max(256, -(-n // 64) * 64)))


def _synchronize(xp):
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.Device().synchronize()


def measure_matmul_flops(device: str = "cpu", n: int = 512, seconds: float = 0.5) -> float:
    """The float32 matrix-product rate (FLOP/s) of ``device``: ``(n, n) @ (n, n)`` timed for about ``seconds``.

    One product costs ``2 n^3`` FLOPs. The time is split into five windows and
    the fastest window counts (the rate the hardware reaches, not the average
    over whatever else the machine is doing). On the CPU the product runs on
    autograd's threads, as the model's do.
    """
    xp = backend.array_module_for_device(device)
    rng = np.random.default_rng(0)
    a = backend.to_device(rng.standard_normal((n, n), dtype=np.float32), device)
    b = backend.to_device(rng.standard_normal((n, n), dtype=np.float32), device)

    def product():
        kernels.matmul(a, b)

    product()  # warm-up (threads, CUDA kernels)
    _synchronize(xp)
    t0 = time.perf_counter()
    reps = 1
    while True:  # how many products fill a tenth of the budget
        product()
        _synchronize(xp)
        dt = time.perf_counter() - t0
        if dt > seconds / 50 or reps > 10_000:
            break
        reps += 1
    per_window = max(1, int(reps * (seconds / 5) / max(dt, 1e-9)))
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(per_window):
            product()
        _synchronize(xp)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * per_window / best


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops_per_token * tokens_per_s / peak_flops`` (0 where the peak is unknown)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0


__all__ = ["MetricsWriter", "read_metrics", "Progress", "matmul_size_for", "measure_matmul_flops", "mfu"]
