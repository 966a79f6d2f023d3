"""``llm/plots.py`` and ``python -m llm gradients``: the tables drawn from --grad-stats metrics, the PNGs, the errors."""

import json
import math
import sys

import numpy as np
import pytest

from llm import plots


def stats(block_norms, head=True, act=None):
    out = {"embed": {"grad_norm": 1.0, "update_ratio": 0.01, "act_rms": 0.02}}
    for i, g in enumerate(block_norms):
        out[f"h.{i}"] = {"grad_norm": g, "update_ratio": 0.001 * (i + 1), "act_rms": None if act is None else act[i]}
    if head:
        out["head"] = {"grad_norm": 0.5, "update_ratio": 0.002}
    return out


RECORDS = [{"step": 1, "loss": 7.0, "grad_stats": stats([4.0, 2.0, 1.0], act=[1.0, 2.0, 3.0])},
           {"step": 5, "loss": 6.0},  # a line without statistics (e.g. --grad-stats off for a while)
           {"step": 10, "loss": 5.0, "grad_stats": stats([0.5, None, 2.0], head=False, act=[1.0, 1.0, 1.0])}]


def test_layer_table_rows_columns_and_missing_values():
    steps, layers, table = plots.layer_table(RECORDS)
    assert steps == [1, 10] and layers == ["embed", "h.0", "h.1", "h.2", "head"]
    np.testing.assert_array_equal(table[:, 0], [1.0, 4.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(table[:, 1], [1.0, 0.5, np.nan, 2.0, np.nan])
    _, layers, act = plots.layer_table(RECORDS, "act_rms", blocks_only=True)
    assert layers == ["h.0", "h.1", "h.2"] and act[:, 0].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="unknown statistic 'norm'"):
        plots.layer_table(RECORDS, "norm")


def test_profiles_and_ratios():
    np.testing.assert_array_equal(plots.block_profile(RECORDS[0]["grad_stats"]), [4.0, 2.0, 1.0])
    assert plots.first_to_last_ratio(RECORDS[0]["grad_stats"]) == 4.0
    assert plots.first_to_last_ratio(RECORDS[2]["grad_stats"]) == 0.25
    assert math.isnan(plots.first_to_last_ratio({"embed": {"grad_norm": 1.0}}))
    table = plots.summary_table({"run": RECORDS})
    assert "| run | 1..10 | 4 / 1 = 4 | 0.5 / 2 = 0.25 |" in table


def test_without_matplotlib_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(plots.PlotError, match=r'pip install -e "\.\[report\]"'):
        plots.plot_heatmap(RECORDS, "x.png")


def write_run(folder, records):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def test_command_errors_are_clear(tmp_path, capsys):
    assert plots.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bare = write_run(tmp_path / "bare", [{"step": 1, "loss": 3.0}])
    assert plots.main([bare]) == 2
    assert "has no grad_stats: train with --grad-stats" in capsys.readouterr().err


def test_command_without_matplotlib_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = write_run(tmp_path / "a", RECORDS)
    assert plots.main([run]) == 0
    out = capsys.readouterr()
    assert "4 / 1 = 4" in out.out and "matplotlib is not installed" in out.err


def test_command_draws_heat_maps_and_profiles(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'report' extra")
    a, b = write_run(tmp_path / "a", RECORDS), write_run(tmp_path / "b", RECORDS[:1])
    assert plots.main([a, b, "--out", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["a-grad_norm-heatmap.png", "b-grad_norm-heatmap.png", "profiles-grad_norm.png"]
    assert all((tmp_path / "png" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    with pytest.raises(plots.PlotError, match="no metrics line has grad_stats"):
        plots.plot_heatmap([{"step": 1}], tmp_path / "empty.png")


def test_one_colour_scale_spans_every_run():
    other = [{"step": 1, "grad_stats": stats([2e-7, 30.0, 1.0])}]
    assert plots.log_range_of([RECORDS, other]) == (-7, 2)
    assert plots.log_range_of([RECORDS]) == (-1, 1)  # 0.5 .. 4
    assert plots.log_range_of([[{"step": 1}]]) == (-1.0, 1.0)  # nothing to scale: a default
