"""The paper's Table 1 ablations as grids of train.py settings, and free grids from ``--set``.

A cell is a dict ``{option: value}`` of train.py options (ModelConfig or TrainConfig field
names, e.g. ``cls_loss``, ``focal_gamma``, ``min_size``); a list value is an option with
several values (``aspect_ratios``). ``tools/ablate.py`` trains every cell with the same
data, seed and iteration budget.
"""
import itertools
import re

from utils.runtime.errors import ConfigError

# Table 1e / Figure 2: shorter sides trained and tested (the longer side keeps COCO's 1333 / 800).
PAPER_SCALES = (400, 500, 600, 700, 800)
DEMO_SCALES = (64, 96, 128, 160)  # the demo images are 160 px


def _focal(gamma, alpha) -> dict:
    return {"cls_loss": "focal", "focal_gamma": gamma, "focal_alpha": alpha}


def _ohem(batch, nms, fg_ratio=None) -> dict:
    cell = {"cls_loss": "ohem", "ohem_batch": batch, "ohem_nms_thresh": nms}
    return cell if fg_ratio is None else {**cell, "ohem_fg_ratio": fg_ratio}


def _scale(min_size: int) -> dict:
    return {"min_size": min_size, "max_size": round(min_size * 1333 / 800)}


GRIDS = {
    "alpha-ce": ("Table 1a: alpha-balanced cross-entropy (gamma 0) for several alpha",
                 [{"cls_loss": "balanced-ce", "focal_alpha": alpha} for alpha in (0.25, 0.5, 0.75, 0.9, 0.99)]),
    "gamma": ("Table 1b: focal loss for the paper's (gamma, alpha) pairs",
              [_focal(g, a) for g, a in ((0, 0.75), (0.1, 0.75), (0.2, 0.75), (0.5, 0.5), (1, 0.25), (2, 0.25),
                                         (5, 0.25))]),
    "anchors": ("Table 1c: anchor scales per octave x aspect ratios",
                [{"scales_per_octave": scales, "aspect_ratios": list(ratios)}
                 for scales, ratios in ((1, (1.0,)), (2, (1.0,)), (3, (1.0,)), (1, (0.5, 1.0, 2.0)),
                                        (2, (0.5, 1.0, 2.0)), (3, (0.5, 1.0, 2.0)), (4, (0.5, 1.0, 2.0)))]),
    "ohem": ("Table 1d: OHEM (minibatch per image, NMS threshold; 1:3 = at most 25 % foreground) against FL",
             [_ohem(b, nms) for nms in (0.7, 0.5) for b in (128, 256, 512)]
             + [_ohem(b, 0.5, 0.25) for b in (128, 256, 512)] + [_focal(2, 0.25)]),
    "loss": ("CE, alpha-balanced CE, OHEM and FL, each at the paper's best setting",
             [{"cls_loss": "ce"}, {"cls_loss": "balanced-ce", "focal_alpha": 0.75}, _ohem(128, 0.5),
              _focal(2, 0.25)]),
    "imbalance": ("alpha-CE at alpha .25 / .5 / .75 and FL gamma 1 / 2 / 5 at alpha .25 (FL gamma 0 is alpha-CE "
                  "at .75, Table 1b's first row): does CE collapse and gamma matter more under a COCO-like imbalance "
                  "(--data-preset sparse)?",
                  [{"cls_loss": "balanced-ce", "focal_alpha": alpha} for alpha in (0.25, 0.5, 0.75)]
                  + [_focal(gamma, 0.25) for gamma in (1, 2, 5)]),
    # "scale" depends on the data: see scale_cells().
    "scale": ("Table 1e / Figure 2: the same model trained and tested at several image sizes, AP against time", []),
}


# The cell every other is compared with, seed by seed (tools/ablate.py --baseline overrides it): the
# paper's reference setting of each table. alpha-CE at .75 is Table 1a's best and Table 1b's gamma 0;
# FL gamma 2 alpha .25 the paper's model, against which the loss and OHEM grids measure the others;
# 3 scales x 3 ratios and the recipe's own size are the model's defaults.
BASELINES = {
    "alpha-ce": {"cls_loss": "balanced-ce", "focal_alpha": 0.75}, "gamma": _focal(0, 0.75),
    "anchors": {"scales_per_octave": 3, "aspect_ratios": [0.5, 1.0, 2.0]}, "ohem": _focal(2, 0.25),
    "loss": _focal(2, 0.25), "imbalance": {"cls_loss": "balanced-ce", "focal_alpha": 0.75},
}


def baseline_index(cells: list, grid: str, demo: bool, label: str = None) -> int:
    """Index of the baseline among ``cells``: the one labelled ``label`` if given, else the first cell
    holding the grid's BASELINES setting (the scale grid: the recipe's size, 128 or 800), else 0."""
    labels = [cell_label(cell) for cell in cells]
    if label is not None:
        if label not in labels:
            raise ConfigError(f"--baseline {label!r} is none of the cells: {', '.join(repr(x) for x in labels)}")
        return labels.index(label)
    default = _scale(128 if demo else 800) if grid == "scale" else BASELINES.get(grid)
    if default:
        wanted = {key: format_value(value) for key, value in default.items()}
        for index, cell in enumerate(cells):
            if all(key in cell and format_value(cell[key]) == value for key, value in wanted.items()):
                return index
    return 0


def scale_cells(demo: bool) -> list:
    return [_scale(s) for s in (DEMO_SCALES if demo else PAPER_SCALES)]


def grid_cells(name: str, demo: bool) -> list:
    if name not in GRIDS:
        raise ConfigError(f"--grid {name}: choose one of {', '.join(GRIDS)}")
    return scale_cells(demo) if name == "scale" else [dict(cell) for cell in GRIDS[name][1]]


def parse_set(specs: list) -> list:
    """``["key=v1,v2", "key2=w1,w2"]`` -> the cells of their product, in order.

    Keys are train.py option names with ``_`` or ``-``; a value with spaces is an option
    with several values (``--set "aspect_ratios=1,0.5 1 2"``: two cells).
    """
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        choices = [v.strip() for v in values.split(",")] if sep else []
        if not key or not re.fullmatch(r"[a-z][a-z0-9_]*", key) or not choices or not all(choices):
            raise ConfigError(f"--set {spec!r}: expected KEY=VALUE[,VALUE...], e.g. --set focal_gamma=0,1,2")
        axes.append([(key, value.split() if " " in value else value) for value in choices])
    return [dict(combination) for combination in itertools.product(*axes)]


def combine(grid: list, overrides: list) -> list:
    """Every grid cell with every ``--set`` combination applied on top (``--set`` wins on a shared key)."""
    if not grid:
        return overrides
    if not overrides:
        return grid
    return [{**cell, **override} for cell in grid for override in overrides]


def format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cell_flags(cell: dict) -> list:
    """``{"focal_gamma": 2, "aspect_ratios": [0.5, 1]}`` ->
    ``["--focal-gamma", "2", "--aspect-ratios", "0.5", "1"]``."""
    flags = []
    for key, value in cell.items():
        flags.append("--" + key.replace("_", "-"))
        flags += [format_value(v) for v in value] if isinstance(value, (list, tuple)) else [format_value(value)]
    return flags


# Short names for the table, in the paper's words; anything else reads key=value.
_NAMES = {"cls_loss": "", "focal_gamma": "gamma", "focal_alpha": "alpha", "ohem_batch": "batch",
          "ohem_nms_thresh": "nms", "ohem_fg_ratio": "fg", "scales_per_octave": "scales",
          "aspect_ratios": "ratios", "min_size": "size", "max_size": "max"}
_LOSS_NAMES = {"focal": "FL", "ce": "CE", "balanced-ce": "alpha-CE", "ohem": "OHEM"}


def cell_label(cell: dict) -> str:
    """A readable name for a table row: ``FL gamma=2 alpha=0.25``, ``OHEM batch=128 nms=0.5``."""
    parts = []
    for key, value in cell.items():
        if key == "cls_loss":
            parts.append(_LOSS_NAMES.get(value, str(value)))
        else:
            parts.append(f"{_NAMES.get(key, key)}={format_value(value).replace(' ', ',')}")
    return " ".join(parts) or "default"


def cell_slug(cell: dict) -> str:
    """A folder name that identifies the cell: ``cls_loss=ohem__ohem_batch=128``."""
    text = "__".join(f"{key}={format_value(value).replace(' ', '-')}" for key, value in cell.items()) or "default"
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", text)[:200]
