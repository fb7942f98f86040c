"""Caffe's tools/extra/plot_training_log.py: one chart of several training logs, saved as a PNG.

Chart types (Caffe's numbering)::

    0: Test accuracy vs. Iters        4: Train learning rate vs. Iters
    1: Test accuracy vs. Seconds      5: Train learning rate vs. Seconds
    2: Test loss vs. Iters            6: Train loss vs. Iters
    3: Test loss vs. Seconds          7: Train loss vs. Seconds

and two of minicaffe's, numbered after Caffe's so its numbers keep their meaning::

    8: Train and test loss vs. Iters  9: Train and test loss vs. Seconds

``--log_y`` draws the y axis on a log scale (losses fall over decades; non-positive values are left
out of a log chart, as they have no place on it).

Logs are read with :func:`minicaffe.tools.parse_log.parse_log` (no helper shell script, no CSV files
left behind). "accuracy" and "loss" are the output columns of those names; nets that name their
outputs otherwise (GoogLeNet's ``loss3/top-1``) get the last column that looks like one, or the one
named with ``--field``. Unlike Caffe's script, colours and markers are deterministic and log names
need not end in ``.log``. matplotlib (Agg backend, no display needed) is an optional dependency.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import re
import sys
from typing import Sequence

from ..errors import DataError
from ..fileio import atomic_write
from .argparsing import ArgumentParser
from .common import run_main
from .parse_log import parse_log

# (table, y field, x column), in Caffe's order: y fields sorted, then Iters before Seconds
CHART_TYPES = [
    ("test", "accuracy", "NumIters"), ("test", "accuracy", "Seconds"),
    ("test", "loss", "NumIters"), ("test", "loss", "Seconds"),
    ("train", "learning rate", "NumIters"), ("train", "learning rate", "Seconds"),
    ("train", "loss", "NumIters"), ("train", "loss", "Seconds"),
    # minicaffe's: both tables on one chart, to see over-fitting at a glance
    ("train+test", "loss", "NumIters"), ("train+test", "loss", "Seconds"),
]
_X_LABEL = {"NumIters": "Iters", "Seconds": "Seconds"}


def _table_title(table):
    return "Train and test" if table == "train+test" else table.capitalize()


def chart_description(chart_type):
    table, y, x = CHART_TYPES[chart_type]
    return f"{_table_title(table)} {y} vs. {_X_LABEL[x]}"


def chart_help():
    return "\n".join(f"  {i}: {chart_description(i)}" for i in range(len(CHART_TYPES)))


def pick_column(rows, field, explicit=None, path="<log>"):
    """The column of ``rows`` to plot for ``field`` ('accuracy', 'loss' or 'learning rate')."""
    if field == "learning rate":
        return "LearningRate"
    names = []
    for row in rows:
        names += [k for k in row if k not in names and k not in ("NumIters", "Seconds", "LearningRate")]
    if explicit is not None:
        if explicit not in names:
            raise DataError(f"{path}: no output named '{explicit}' (outputs: {', '.join(names) or 'none'})")
        return explicit
    if field in names:
        return field
    pattern = re.compile(r"acc|top-?1" if field == "accuracy" else r"loss", re.I)
    candidates = [n for n in names if pattern.search(n) and not (field == "loss" and re.search(r"top|acc", n))]
    if not candidates:
        raise DataError(f"{path}: no {field} output among {', '.join(names) or 'no outputs'}; "
                        "name one with --field")
    return candidates[-1]


def _legend_labels(paths):
    """File names without '.log'; the paths as given where two logs share a name."""
    names = [os.path.basename(p) for p in paths]
    names = [n[:-4] if n.endswith(".log") and len(n) > 4 else n for n in names]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def _pyplot():
    # Figure + the Agg canvas directly: no display, and pyplot's global backend is left alone
    from ..deps import require
    agg = require("matplotlib.backends.backend_agg", "plot_training_log")
    return require("matplotlib.figure", "plot_training_log").Figure, agg.FigureCanvasAgg


def plot_chart(chart_type: int, out_path: str, log_paths: Sequence[str], field: str | None = None,
               dpi: int = 100, log_y: bool = False) -> str:
    """Draw ``chart_type`` for every log in ``log_paths`` and write the image to ``out_path``
    (``log_y``: a logarithmic y axis)."""
    if not 0 <= chart_type < len(CHART_TYPES):
        raise DataError(f"{chart_type} is not a valid chart type; choose one of\n{chart_help()}")
    table, y_field, x_col = CHART_TYPES[chart_type]
    Figure, FigureCanvasAgg = _pyplot()
    fig = Figure(figsize=(8, 5), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fmt = os.path.splitext(out_path)[1][1:].lower()
    if fmt not in canvas.get_supported_filetypes():
        raise DataError(f"{out_path}: unsupported image type '.{fmt}' (use .png)")
    ax = fig.add_subplot(1, 1, 1)
    tables = table.split("+")
    for path, label in zip(log_paths, _legend_labels(log_paths)):
        train, test = parse_log(path)
        for name in tables:
            rows = test if name == "test" else train
            if not rows:
                raise DataError(f"{path}: no '{name.capitalize()} net output' lines to plot")
            col = pick_column(rows, y_field, field, path)
            points = [(r[x_col], r.get(col, math.nan)) for r in rows]
            points = [(x, y) for x, y in points if isinstance(y, float) and not math.isnan(x)]
            if log_y:
                points = [(x, y) for x, y in points if y > 0]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            text = label if col in (y_field, "LearningRate") else f"{label} ({col})"
            if len(tables) > 1:       # train and test lines: one log needs no name
                text = f"{text} {name}" if len(log_paths) > 1 else name
            ax.plot(xs, ys, label=text, linewidth=0.75, marker="o" if len(xs) <= 50 else None, markersize=3,
                    linestyle="--" if name == "test" and len(tables) > 1 else "-")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(chart_description(chart_type))
    ax.set_xlabel(_X_LABEL[x_col])
    ax.set_ylabel(f"{_table_title(table)} {y_field}")
    ax.grid(True, alpha=0.3)
    loc = "lower right" if y_field == "accuracy" else "upper right"
    ax.legend(loc=loc, ncol=1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write(out_path, buf.getvalue())
    return out_path


@run_main
def main(argv=None):
    parser = ArgumentParser(
        prog="plot_training_log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plot one chart of one or more Caffe/minicaffe training logs.",
        epilog="Supported chart types:\n" + chart_help())
    parser.add_argument("chart_type", type=int, help=f"0-{len(CHART_TYPES) - 1}, see below")
    parser.add_argument("out", metavar="OUT.png", help="where to save the image")
    parser.add_argument("logs", metavar="LOG", nargs="+", help="training log(s), one line each")
    parser.add_argument("--field", help="the output column to plot (default: 'accuracy' or 'loss')")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--log_y", action="store_true", help="a logarithmic y axis (for losses)")
    args = parser.parse_args(argv)
    for path in args.logs:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
    plot_chart(args.chart_type, args.out, args.logs, args.field, args.dpi, args.log_y)
    print(f"Wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
