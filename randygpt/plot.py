"""Loss curves as pictures: a run's metrics.jsonl in, a PNG out.

Training redraws <out>/loss.png after every evaluation (train.py, Reporter.draw);
`randygpt plot RUN [RUN ...]` draws one run the same way, or several runs in one picture to
compare them. matplotlib is an optional extra (pip install -e '.[plots]'), imported only
inside the functions that draw, and used through its object API on the Agg canvas: no pyplot,
so no window backend, no global list of open figures, nothing shared between threads.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from .checkpoint import write_atomic
from .errors import UserError

METRICS, PICTURE, COMPARISON = "metrics.jsonl", "loss.png", "runs-compare.png"
# one run's picture; the tests look for these colours along the curves
TRAIN_COLOUR, VAL_COLOUR, LR_COLOUR = "#1f77b4", "#d62728", "#7f7f7f"
# a comparison: one colour per run (matplotlib's tab10), val solid and train dashed in it
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#7f7f7f")
NO_MATPLOTLIB = "matplotlib is not installed: pip install -e '.[plots]'"
_NEEDED = ("iter", "train_loss", "val_loss")


# ---------------------------------------------------------------------------------------------
# reading a run

def metrics_file(run: str) -> str:
    """The metrics.jsonl of `run`, a run directory or the file itself."""
    if not os.path.exists(run):
        raise UserError(f"{run}: no such run directory or file")
    path = os.path.join(run, METRICS) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"{run} has no {METRICS}: give a run directory (train --out)")
    return path


def read_metrics(run: str) -> list[dict]:
    """The evaluation rows of a run (a directory or its metrics.jsonl), by iteration. A torn
    last line (a run killed mid-write) is skipped; any other line that is no row is an error."""
    path = metrics_file(run)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a {METRICS}: it is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    rows = {}
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and all(isinstance(row.get(k), (int, float))
                                              for k in _NEEDED)):
            if n == len(lines):
                break
            raise UserError(f"{path}: line {n} is not a metrics row (JSON with "
                            f"{', '.join(_NEEDED)})")
        rows[row["iter"]] = row         # (a resume trims its file: iterations are unique)
    if not rows:
        raise UserError(f"{path} has no evaluations yet: a run writes one every eval_interval "
                        "iterations")
    return [rows[i] for i in sorted(rows)]


def _name(run: str) -> str:
    """A run's name in a picture: its directory's name."""
    path = os.path.abspath(run)
    return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))


# ---------------------------------------------------------------------------------------------
# drawing

def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(NO_MATPLOTLIB) from None
    return Figure(figsize=(9, 5), dpi=100, layout="constrained")


def _tokens_scale(iters, tokens):
    """iteration <-> tokens seen, for the top axis: straight lines through (0, 0) and every
    row, and on past both ends at the run's mean rate (the axis spans a little beyond the
    data). None when the rows cannot give a one-to-one scale (no or unordered counts)."""
    x, y = np.array([0, *iters], float), np.array([0, *tokens], float)
    if not (np.all(np.diff(x) > 0) and np.all(np.diff(y) > 0)):
        return None
    far, rate = 1e3 * x[-1], y[-1] / x[-1]
    x, y = np.r_[-far, x, x[-1] + far], np.r_[-far * rate, y, y[-1] + far * rate]
    return (lambda i: np.interp(i, x, y)), (lambda t: np.interp(t, y, x))


def draw_run(rows: list[dict], name: str):
    """One run: train (dashed) and val loss against iterations, tokens seen on the top axis,
    the learning rate on a second y axis at the right. Returns the matplotlib Figure."""
    fig = _figure()                 # first: it says when matplotlib is missing
    from matplotlib.ticker import EngFormatter, FuncFormatter
    ax = fig.add_subplot()
    iters = [r["iter"] for r in rows]
    lr_ax = ax.twinx()        # drawn over ax: its thin line goes under the losses' markers
    lr_ax.plot(iters, [r.get("lr", np.nan) for r in rows], color=LR_COLOUR, lw=1,
               label="learning rate")
    lr_ax.set_ylabel("learning rate", color=LR_COLOUR)
    # plain labels (0.0002): a "1e-3" offset above the axis would sit on the tokens' ticks
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    lr_ax.set_ylim(bottom=0)
    ax.set_zorder(lr_ax.get_zorder() + 1)      # the losses on top, the LR behind them
    ax.patch.set_visible(False)
    ax.plot(iters, [r["train_loss"] for r in rows], color=TRAIN_COLOUR, ls="--", lw=1.8,
            marker="o", ms=4, label="train loss")
    ax.plot(iters, [r["val_loss"] for r in rows], color=VAL_COLOUR, lw=2, marker="o", ms=4,
            label="val loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    scale = (_tokens_scale(iters, [r["tokens"] for r in rows])
             if all(isinstance(r.get("tokens"), int) for r in rows) else None)
    if scale is not None:
        top = ax.secondary_xaxis("top", functions=scale)
        top.set_xlabel("training tokens seen")
        top.xaxis.set_major_formatter(EngFormatter(sep=""))
    last = rows[-1]
    ax.set_title(f"{name}: val loss {last['val_loss']:.4f}, train loss "
                 f"{last['train_loss']:.4f} at iteration {last['iter']}")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return fig


def draw_runs(runs: list[tuple[str, list[dict]]]):
    """Several runs in one picture: a colour per run, val loss solid, train loss dashed,
    against iterations. Returns the matplotlib Figure."""
    fig = _figure()
    from matplotlib.lines import Line2D
    ax = fig.add_subplot()
    handles = []
    for i, (name, rows) in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        iters = [r["iter"] for r in rows]
        ax.plot(iters, [r["train_loss"] for r in rows], color=colour, ls="--", lw=1.5)
        ax.plot(iters, [r["val_loss"] for r in rows], color=colour, lw=2)
        handles.append(Line2D([], [], color=colour, lw=2,
                              label=f"{name} (val {rows[-1]['val_loss']:.4f})"))
    handles += [Line2D([], [], color="black", lw=2, label="val loss"),
                Line2D([], [], color="black", lw=1.5, ls="--", label="train loss")]
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{len(runs)} runs: val loss solid, train loss dashed")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)))
    return fig


def _write(fig, path: str) -> str:
    """The figure as a PNG at path, atomically (a reader never sees half a picture)."""
    if os.path.isdir(path) or not path.lower().endswith(".png"):
        raise UserError(f"{path}: the picture is a PNG: give a file name ending in .png")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return path


def write_run_picture(run: str, out: str | None = None) -> str:
    """Draw one run (a directory or its metrics.jsonl) to `out`, default its loss.png."""
    rows = read_metrics(run)
    return _write(draw_run(rows, _name(run)),
                  out or os.path.join(os.path.dirname(metrics_file(run)), PICTURE))


def write_comparison(runs: list[str], out: str = COMPARISON) -> str:
    """Draw several runs in one picture at `out`; each is named by its directory's name, or
    as given when two share one."""
    names = [_name(r) for r in runs]
    named = [(n if names.count(n) == 1 else r, read_metrics(r)) for n, r in zip(names, runs)]
    return _write(draw_runs(named), out)
