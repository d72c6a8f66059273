"""Report building blocks shared by the recipes: result tables, paired comparisons, panels,
per-item latency.

A recipe's final stage writes ``<run_dir>/report.md``, ``metrics.json`` and PNG figures with
these, and prints the main table. Tables show ``mean +- std`` over volumes (docs/methods.md); the
paired tests compare per-volume (or per-slice) values of two models on the same data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from kdhpc.bench import markdown_table, time_ms
from kdhpc.config import write_atomic
from kdhpc.metrics import format_mean_std, paired_test, summarize


def mean_std_rows(per_model: Mapping[str, Mapping[str, Sequence[float]]],
                  metrics: Sequence[str], fmt: str = ".4f") -> list[dict]:
    """One row per model: ``{"model": name, metric: "mean +- std", ...}`` from per-volume
    values ``per_model[name][metric]``."""
    rows = []
    for name, values in per_model.items():
        row: dict[str, Any] = {"model": name}
        for metric in metrics:
            stats = summarize(values[metric])
            row[metric] = format_mean_std(stats["mean"], stats["std"], fmt=fmt)
        rows.append(row)
    return rows


def paired_rows(per_model: Mapping[str, Mapping[str, Sequence[float]]],
                pairs: Sequence[tuple[str, str]], metrics: Sequence[str]) -> list[dict]:
    """Paired t-tests ``a`` vs ``b`` on per-volume values: mean difference (a - b) and p."""
    rows = []
    for a, b in pairs:
        for metric in metrics:
            test = paired_test(per_model[a][metric], per_model[b][metric])
            rows.append({"comparison": f"{a} vs {b}", "metric": metric,
                         "mean diff": f"{test['mean_difference']:+.4g}",
                         "p": f"{test['p_value']:.3g}",
                         "n": test["n"]})
    return rows


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


def save_panel(images: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike,
               rows: int = 1, cmap: str = "gray", vmax: Sequence[float | None] | None = None,
               overlays: Sequence[np.ndarray | None] | None = None) -> Path:
    """A grid of 2-D images with titles (qualitative figures); ``overlays`` are label maps drawn
    as contours. Written through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = int(np.ceil(len(images) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
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
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def latency_ms(model: torch.nn.Module, inputs: Sequence[torch.Tensor], threads: int,
               repeats: int = 20, forward: Callable[..., Any] | None = None) -> float:
    """Median milliseconds of one inference call ``model(*inputs)`` with ``threads`` intra-op
    threads (eval mode, inference mode), restoring the thread count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = inputs[0].device
    call = forward or model
    try:
        model.eval()
        with torch.inference_mode():
            return time_ms(lambda: call(*inputs), device, warmup=3, repeats=repeats)
    finally:
        torch.set_num_threads(previous)
