"""`neoxt plot`: loss, smoothed loss, learning rate, gradient norm, throughput and eval scores of one or
more runs, overlaid, as one PNG — from ``metrics.jsonl`` and ``eval.jsonl`` alone.

matplotlib runs on its headless Agg backend, so this works on a login node without a display.
Tokens on the x axis are rebuilt from the records (tokens/s × step time per logged step, times the
iterations since the previous record): the metrics file does not store a running token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoxt.errors import NeoxtError
from neoxt.io import atomic_open
from neoxt.ops.status import EVAL, METRICS, smooth


class PlotError(NeoxtError):
    """A run to plot has no metrics, or the output cannot be written."""


@dataclass(frozen=True)
class Series:
    """One run's curves, aligned on its logged iterations."""

    name: str
    iteration: list[int]
    tokens: list[float]
    loss: list[float | None]
    lr: list[float | None]
    grad_norm: list[float | None]
    tokens_per_s: list[float | None]
    eval_iteration: list[int]
    eval_scores: dict[str, list[float | None]]


def _records(path: Path) -> list[dict[str, Any]]:
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if isinstance(rec, dict) and isinstance(rec.get("iteration"), int):
                out.append(rec)
    return out


def load_series(run: Path, name: str | None = None) -> Series:
    """The curves of ``run`` (a run directory or its ``metrics.jsonl``)."""
    run = Path(run)
    metrics = run if run.is_file() else run / METRICS
    if not metrics.is_file():
        raise PlotError(f"{run}: no {METRICS} (is this a neoxt run directory?)")
    recs = _records(metrics)
    if not recs:
        raise PlotError(f"{metrics}: no records yet")
    # A resumed run appends after the checkpoint it restarted from: keep the last record per iteration.
    by_iter = {r["iteration"]: r for r in recs}
    recs = [by_iter[i] for i in sorted(by_iter)]
    tokens, total, prev = [], 0.0, 0
    for r in recs:
        per_iter = (r.get("tokens_per_s") or 0.0) * (r.get("step_time_s") or 0.0)
        total += per_iter * (r["iteration"] - prev)
        prev = r["iteration"]
        tokens.append(total)
    evals_path = (metrics.parent / EVAL)
    evals = _records(evals_path) if evals_path.is_file() else []
    # valid_ppl is exp(valid_loss): drawn too, it would flatten every other score on the axis.
    keys = sorted({k for e in evals for k, v in e.items()
                   if k not in ("iteration", "time", "tokens", "valid_ppl") and isinstance(v, (int, float))})
    return Series(
        name=name or (run.parent.name if run.is_file() else run.name),
        iteration=[r["iteration"] for r in recs],
        tokens=tokens,
        loss=[r.get("loss") for r in recs],
        lr=[r.get("lr") for r in recs],
        grad_norm=[r.get("grad_norm") for r in recs],
        tokens_per_s=[r.get("tokens_per_s") for r in recs],
        eval_iteration=[e["iteration"] for e in evals],
        eval_scores={k: [e.get(k) for e in evals] for k in keys},
    )


def _line(ax, x: Sequence[float], y: Sequence[float | None], **kw) -> None:
    pts = [(a, b) for a, b in zip(x, y) if b is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **kw)


def plot_runs(series: Sequence[Series], output: Path, smoothing: float = 0.9, dpi: int = 100) -> Path:
    """Draw every run on a 2×3 grid and write the PNG atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (a_loss, a_tok, a_lr), (a_norm, a_eval, a_speed) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(series):
        c = colors[i % len(colors)]
        sm = smooth(s.loss, smoothing)
        for ax, x in ((a_loss, s.iteration), (a_tok, s.tokens)):
            _line(ax, x, s.loss, color=c, alpha=0.3, linewidth=0.8)
            _line(ax, x, sm, color=c, linewidth=1.6, label=s.name)
        _line(a_lr, s.iteration, s.lr, color=c, label=s.name)
        _line(a_norm, s.iteration, s.grad_norm, color=c, label=s.name)
        _line(a_speed, s.iteration, s.tokens_per_s, color=c, label=s.name)
        styles = ("-", "--", ":", "-.")
        for j, (key, vals) in enumerate(s.eval_scores.items()):
            _line(a_eval, s.eval_iteration, vals, color=c, linestyle=styles[j % len(styles)], marker="o",
                  markersize=3, label=f"{s.name}: {key}")
    titles = (
        (a_loss, "loss (faint: raw, bold: smoothed)", "iteration"), (a_tok, "loss vs tokens", "tokens"),
        (a_lr, "learning rate", "iteration"), (a_norm, "gradient norm", "iteration"),
        (a_eval, "eval scores", "iteration"), (a_speed, "tokens/s", "iteration"),
    )
    for ax, title, xlabel in titles:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    output = Path(output)
    try:
        with atomic_open(output, "wb") as f:
            fig.savefig(f, dpi=dpi, format="png")
    except OSError as err:
        raise PlotError(f"{output}: cannot write the plot: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return output
