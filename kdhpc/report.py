"""Report building blocks shared by the recipes: result tables, paired comparisons, latency
tables, panels.

A recipe's final stage writes ``<run_dir>/report.md``, ``metrics.json`` and PNG figures with
these, and prints the main table. Tables show ``mean +- std`` over volumes (docs/methods.md); the
paired tests compare per-volume (or per-slice) values of two models on the same data.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdhpc.bench import markdown_table
from kdhpc.config import write_atomic
from kdhpc.metrics import format_mean_std, summarize


def mean_std(values: Sequence[float], spec: str = ".4f") -> str:
    """``mean +- std`` (sample std) of per-volume values; the mean alone for one value."""
    if not len(values):
        return "n/a"
    stats = summarize(values)
    if not math.isfinite(stats["std"]):
        return f"{stats['mean']:{spec}}"
    return format_mean_std(stats["mean"], stats["std"], fmt=spec)


def mean_std_rows(per_model: Mapping[str, Mapping[str, Sequence[float]]],
                  metrics: Sequence[str], formats: Mapping[str, str] | str = ".4f",
                  labels: Mapping[str, str] | None = None) -> list[dict]:
    """A results table: one row per model, ``{"model": name, label: "mean +- std"}`` over the
    per-volume values ``per_model[name][metric]``."""
    def spec(metric: str) -> str:
        return formats if isinstance(formats, str) else formats[metric]

    return [{"model": name, **{(labels or {}).get(m, m): mean_std(values[m], spec(m))
                               for m in metrics}} for name, values in per_model.items()]


def number(value: Any, spec: str = ".3g") -> str:
    """``value`` formatted, or "n/a" for a missing or undefined (NaN) one."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def with_ci(test: Mapping[str, Any], spec: str = "+.4g") -> str:
    """A paired test's mean difference with its 95% CI: ``+0.123 [+0.01, +0.24]``."""
    text = number(test.get("mean_difference"), spec)
    ci = test.get("ci95")
    return text if not ci else f"{text} [{number(ci[0], spec)}, {number(ci[1], spec)}]"


def comparison_row(comparison: str, metric: str, test: Mapping[str, Any],
                   spec: str = "+.4g") -> dict:
    """A paired test (:func:`kdhpc.metrics.paired_test`) as a table row: the mean difference
    with its 95% CI, the p-value and the number of pairs ("n/a" where undefined)."""
    return {"comparison": comparison, "metric": metric, "mean diff [95% CI]": with_ci(test, spec),
            "p": number(test.get("p_value"), ".3g"), "n": test["n"]}


def latency_table(rows: Sequence[dict]) -> str:
    """Markdown of :func:`kdhpc.recipe.latency_rows` rows, times to 0.01 ms."""
    return table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()}
                  for row in rows])


def write_report(run_dir: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]],
                 metrics: Mapping[str, Any]) -> Path:
    """Write ``report.md`` (title, then ``(heading, markdown)`` sections) and ``metrics.json``
    atomically into ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    body = [f"# {title}\n"] + [f"## {heading}\n\n{text.rstrip()}\n" for heading, text in sections]
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=1, default=float))
    return write_atomic(run_dir / "report.md", "\n".join(body))


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Markdown table of ``rows`` (the same renderer as the benchmark results)."""
    return markdown_table(rows, columns)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write a figure through a temporary file (a reader never sees half a PNG)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def save_curves(curves: Mapping[str, Sequence[tuple[float, float, float]]],
                levels: Mapping[str, tuple[float, str]], path: str | os.PathLike, xlabel: str,
                ylabel: str, title: str) -> Path:
    """A metric against a setting (alpha): one line per curve of ``(x, mean, error bar)``
    points, and horizontal lines ``levels[label] = (y, linestyle)`` (teacher, baselines)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, points in curves.items():
        x, y, err = zip(*sorted(points))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    for (label, (y, style)), color in zip(levels.items(), ("k", "tab:green", "gray", "tab:red")):
        ax.axhline(y, color=color, linestyle=style, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def save_panel(images: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike,
               rows: int = 1, cmap: str = "gray", vmax: Sequence[float | None] | None = None,
               overlays: Sequence[np.ndarray | None] | None = None) -> Path:
    """A grid of 2-D images with titles (qualitative figures); ``overlays`` are label maps drawn
    as contours. Written through a temporary file."""
    cols = int(np.ceil(len(images) / rows))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        top = None if vmax is None else vmax[i]
        ax.imshow(images[i], cmap=cmap, vmin=0 if top is not None else None, vmax=top)
        if overlays is not None and overlays[i] is not None:
            labels = overlays[i]
            ax.contour(labels, levels=np.arange(0.5, labels.max() + 0.5), linewidths=0.8,
                       cmap="autumn")
        ax.set_title(titles[i], fontsize=8)
    return _save(fig, path)
