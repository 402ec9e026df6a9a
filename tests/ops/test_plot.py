"""Acceptance 2 of the operate issue: `neoxt plot` writes one PNG for several runs."""

from __future__ import annotations

import json
import math

from statuskit import write_run

from neoxt.cli import main


def _curve(run, n: int, scale: float) -> None:
    """Replace the run's metrics with ``n`` logged steps (a resumed stretch repeats a few) and evals."""
    recs = [{"iteration": i, "loss": scale * (3 + math.exp(-i / 10)), "lr": 1e-3 * min(1, i / 5), "grad_norm": 1 / i,
             "tokens_per_s": 1000.0 + i, "step_time_s": 0.25, "nan_count": 0, "time": 0.0} for i in range(1, n + 1)]
    recs += recs[-3:]  # a restart from a checkpoint logs the last steps again
    recs.append({"iteration": n + 1, "loss": None, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 0.0,
                 "step_time_s": 0.25, "nan_count": 1, "time": 0.0})  # a NaN step: null loss
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    evals = [{"iteration": i, "valid_loss": scale * 3.2 - i / 100, "valid_ppl": 20.0, "tokens": 64, "time": 0.0}
             for i in range(10, n + 1, 10)]
    evals.append({"iteration": n, "eval/lambada_acc": 0.31, "time": 0.0})
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))


def test_plot_two_runs_png(tmp_path, capsys):
    from PIL import Image

    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    _curve(a, 60, 1.0)
    _curve(b, 40, 1.1)
    out = tmp_path / "plots" / "loss.png"
    assert main(["plot", str(a), str(b / "metrics.jsonl"), "-o", str(out)]) == 0
    assert f"wrote {out} (2 run(s))" in capsys.readouterr().out
    assert out.stat().st_size > 30_000  # six panels of curves, not an empty canvas
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1500, 800)
        img.load()
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # drawn lines, legends and text, not a blank figure
    assert not list(tmp_path.joinpath("plots").glob(".*tmp*"))


def test_plot_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "x.png").exists()
