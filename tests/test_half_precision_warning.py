"""float16 compute on NumPy arrays warns once, with the measured slowdown, in a category users can filter."""

import warnings

import numpy as np
import pytest

import nn
from nn import amp


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3, generator=np.random.default_rng(0))


@pytest.fixture
def fresh(monkeypatch):
    """As in a new process: nothing warned yet."""
    monkeypatch.setattr(amp, "_warned_slow_precision", False)


def test_fp16_on_numpy_warns_once_with_the_factor(fresh):
    with pytest.warns(amp.SlowPrecisionWarning) as record:
        amp.MixedPrecision(Tiny(), "fp16")
    message = str(record[0].message)
    assert f"{amp.FP16_ON_NUMPY_SLOWDOWN}x slower" in message
    assert "--precision fp32" in message and "--device cuda" in message
    assert issubclass(amp.SlowPrecisionWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second model in the same process: no second warning
        amp.MixedPrecision(Tiny(), "float16")


@pytest.mark.parametrize("precision", ["fp32", "float32"])
def test_fp32_does_not_warn(fresh, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp.MixedPrecision(Tiny(), precision)


def test_users_can_filter_the_category(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=amp.SlowPrecisionWarning)
        amp.MixedPrecision(Tiny(), "fp16")


def test_the_trainer_can_ask_before_building_anything(fresh):
    """``warn_if_slow_precision(precision, xp)``: the check alone, for code that builds its model later."""
    assert amp.warn_if_slow_precision("fp32", np) is False
    with pytest.warns(amp.SlowPrecisionWarning):
        assert amp.warn_if_slow_precision("fp16", np) is True
    assert amp.warn_if_slow_precision("fp16", np) is False  # once
