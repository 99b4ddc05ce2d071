"""Means, spreads and 95 % intervals over seeds, for tools/ablate.py's tables.

A cell trained with n seeds gives n values of a metric. Reported: the mean, the sample
standard deviation (n - 1 in the denominator) and the 95 % confidence interval of the mean,
mean +- t * std / sqrt(n) with t the 0.975 quantile of Student's t with n - 1 degrees of
freedom (n is small, 2 to 5: the normal 1.96 would make the interval far too narrow).

A cell against the grid's baseline cell is compared seed by seed: the same seed gives both
the same initialisation draws where the architectures agree, the same data order and the
same augmentation, so much of the seed-to-seed spread cancels in the difference. The
paired difference's interval uses the n seeds both cells finished; ``significant`` means it
excludes 0. No correction for the several cells compared: with 7 cells, one interval in
about 3 grids misses by chance.

Pure Python (no scipy): the t quantile comes from the closed form of the t distribution for
whole degrees of freedom (Abramowitz and Stegun 26.7.3 / 26.7.4), solved by bisection.
"""
import math
import statistics

CONFIDENCE = 0.95


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (a whole number >= 1) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    # The finite series of 26.7.3 (odd df) / 26.7.4 (even df): terms in cos^2(theta).
    term, total = 1.0, 1.0
    for k in range(2 if df % 2 else 1, df - 1, 2):
        term *= cos2 * k / (k + 1)
        total += term
    if df % 2 == 0:
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The t with P(|T| < t) = ``confidence``: 12.706 for df 1, 4.303 for 2, 2.776 for 4 at 95 %."""
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < confidence:
        high *= 2
    for _ in range(100):  # bisection to float precision
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_probability(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def summarize(values: list) -> dict:
    """``{"n", "mean", "std", "ci"}`` of a list of numbers; ``std`` and ``ci`` ([low, high]) are None
    for fewer than 2 values, ``mean`` too for none."""
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half_width = t_quantile(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half_width, mean + half_width]}


def paired_difference(values: dict, baseline: dict) -> dict:
    """``values`` and ``baseline``: ``{seed: value}`` (None: missing); the difference value - baseline
    over the seeds both have: :func:`summarize`'s fields, ``seeds`` (those used) and ``significant``
    (the interval excludes 0; None without an interval)."""
    seeds = [s for s in values if s in baseline and values[s] is not None and baseline[s] is not None]
    summary = summarize([values[s] - baseline[s] for s in seeds])
    significant = None if summary["ci"] is None else (summary["ci"][0] > 0 or summary["ci"][1] < 0)
    return {**summary, "seeds": seeds, "significant": significant}


def metric_values(runs: list, metric: str) -> dict:
    """``{seed: value}`` of ``metric`` over a cell's finished runs (records with ``seed`` and ``metrics``)."""
    return {run["seed"]: run["metrics"].get(metric) for run in runs
            if run.get("status") == "done" and run["metrics"].get(metric) is not None}


def cell_statistics(runs: list, baseline_runs: list, metrics) -> dict:
    """Per metric: the cell's :func:`summarize` with its per-seed ``values``, and ``paired``, its
    :func:`paired_difference` to the baseline's runs (None for the baseline itself)."""
    per_metric = {}
    for metric in metrics:
        values = metric_values(runs, metric)
        entry = {**summarize(list(values.values())), "values": values}
        entry["paired"] = None if baseline_runs is None else paired_difference(values,
                                                                             metric_values(baseline_runs, metric))
        per_metric[metric] = entry
    return per_metric


def seeded_cell(cell: dict, runs: list, baseline_runs, metrics) -> dict:
    """One cell of a seeded grid: ``label``, ``settings``, its ``runs`` (run records, one per seed),
    ``stats`` (:func:`cell_statistics`; ``baseline_runs`` None for the baseline itself),
    ``train_images_per_s`` (median over its finished runs) and ``inference_ms_per_image`` (the
    first run that timed it: ablate.py times one seed per cell)."""
    done = [run for run in runs if run.get("status") == "done"]
    speeds = [run["train_images_per_s"] for run in done if run.get("train_images_per_s") is not None]
    times = [run["inference_ms_per_image"] for run in done if run.get("inference_ms_per_image") is not None]
    return {"label": cell["label"], "settings": cell["settings"], "runs": runs,
            "stats": cell_statistics(runs, baseline_runs, metrics),
            "train_images_per_s": statistics.median(speeds) if speeds else None,
            "inference_ms_per_image": times[0] if times else None}
