"""tools/ablation_stats.py: Student-t quantiles, means, spreads and intervals over seeds, paired differences."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from ablation_stats import (cell_statistics, paired_difference, seeded_cell, summarize,  # noqa: E402
                            t_quantile, t_two_sided_probability)


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262),
                                         (10, 2.228), (30, 2.042), (120, 1.980)])
def test_t_quantiles_match_the_printed_table(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=5e-4)


def test_t_distribution_closed_forms():
    # df 1 is the Cauchy distribution, df 2 has P(|T| < t) = t / sqrt(2 + t^2); large df tends to the normal.
    assert t_two_sided_probability(1.0, 1) == pytest.approx(0.5)
    assert t_two_sided_probability(3.0, 2) == pytest.approx(3 / math.sqrt(11))
    assert t_quantile(2000) == pytest.approx(1.960, abs=2e-3)
    assert t_quantile(4, confidence=0.99) == pytest.approx(4.604, abs=5e-4)
    with pytest.raises(ValueError, match="whole number"):
        t_two_sided_probability(1.0, 0)


def test_summary_of_three_seeds_by_hand():
    summary = summarize([0.2, 0.3, 0.4])
    # mean 0.3, std sqrt((0.01 + 0 + 0.01) / 2) = 0.1, half width 4.303 * 0.1 / sqrt(3) = 0.2484
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(0.3) and summary["std"] == pytest.approx(0.1)
    assert summary["ci"] == pytest.approx([0.3 - 0.24844, 0.3 + 0.24844], abs=1e-4)


def test_one_seed_has_no_spread_and_none_has_no_mean():
    assert summarize([0.25]) == {"n": 1, "mean": 0.25, "std": None, "ci": None}
    assert summarize([]) == {"n": 0, "mean": None, "std": None, "ci": None}
    assert paired_difference({1: 0.3}, {1: 0.2})["significant"] is None


def test_paired_difference_uses_the_seeds_both_have():
    cell = {1: 0.30, 2: 0.34, 3: 0.31, 4: 0.5}
    baseline = {1: 0.20, 2: 0.26, 3: 0.22, 5: 0.1}          # seed 4 and 5 only on one side
    paired = paired_difference(cell, baseline)
    # differences 0.10, 0.08, 0.09: mean 0.09, std 0.01, half width 4.303 * 0.01 / sqrt(3) = 0.02484
    assert paired["seeds"] == [1, 2, 3] and paired["n"] == 3
    assert paired["mean"] == pytest.approx(0.09) and paired["std"] == pytest.approx(0.01)
    assert paired["ci"] == pytest.approx([0.09 - 0.02484, 0.09 + 0.02484], abs=1e-4)
    assert paired["significant"] is True
    # The unpaired spread is far wider: pairing removes what the seeds share.
    assert summarize([0.30, 0.34, 0.31])["ci"][1] - summarize([0.30, 0.34, 0.31])["ci"][0] > 0.08
    noisy = paired_difference({1: 0.30, 2: 0.20}, {1: 0.25, 2: 0.22})   # +0.05, -0.02: the interval holds 0
    assert noisy["significant"] is False and noisy["ci"][0] < 0 < noisy["ci"][1]


def _run(seed, ap, status="done", speed=10.0, ms=None):
    return {"seed": seed, "status": status, "metrics": {"AP": ap, "AP50": None}, "train_images_per_s": speed,
            "inference_ms_per_image": ms}


def test_cell_statistics_and_the_seeded_cell():
    runs = [_run(1, 0.3, ms=5.0), _run(2, 0.4, speed=14.0), {"seed": 3, "status": "failed", "error": "x"}]
    baseline = [_run(1, 0.2), _run(2, 0.2)]
    stats = cell_statistics(runs, baseline, ["AP", "AP50"])
    assert stats["AP"]["values"] == {1: 0.3, 2: 0.4} and stats["AP"]["n"] == 2
    assert stats["AP"]["paired"]["mean"] == pytest.approx(0.15) and stats["AP"]["paired"]["std"] == pytest.approx(
        math.sqrt(0.005))
    assert stats["AP50"]["n"] == 0 and stats["AP50"]["mean"] is None
    assert cell_statistics(runs, None, ["AP"])["AP"]["paired"] is None
    cell = seeded_cell({"label": "FL", "settings": {}}, runs, baseline, ["AP"])
    assert cell["train_images_per_s"] == 12.0 and cell["inference_ms_per_image"] == 5.0 and cell["runs"] is runs
