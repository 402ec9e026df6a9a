"""What a training run reports: a console line, metrics.jsonl, heartbeat.json, TensorBoard, W&B.

``metrics.jsonl`` (one object per logged step) and ``heartbeat.json`` (rewritten atomically every
step) are the files ``neoxt status`` reads; their keys are a contract (DESIGN.md). Validation results
go to ``eval.jsonl`` beside them so every ``metrics.jsonl`` line has the same shape.

Heartbeat ``status``: "running" (also what a crash or ``kill -9`` leaves behind; ``neoxt status``
tells them apart by the age of ``time`` and by ``pid``), "finished", "failed" (an error, or
``on_nan: stop``), "interrupted" (SIGTERM/SIGUSR1 or ``exit_interval``: a checkpoint was saved and
rerunning the same command continues). A "failed" heartbeat also carries ``reason``, the error's
one-line message.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neoxt.config.schema import LoggingConfig
from neoxt.errors import ConfigError
from neoxt.io import write_text_atomic

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
HEARTBEAT_FILE = "heartbeat.json"

# Dense bf16/fp16 peak TFLOP/s per accelerator, matched against the CUDA device name.
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("V100", 125.0))


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj) + "\n")


def default_peak_tflops(device_type: str) -> float | None:
    """The accelerator's dense half-precision peak, or None where unknown (CPU): MFU is then not shown."""
    if device_type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(_dt.timedelta(seconds=int(seconds)))


def _num(x: float | None) -> float | None:
    """JSON has no NaN/inf; keep them readable as null plus the nan counter."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


@dataclass
class StepStats:
    """What one optimizer step produced (loss is the global-batch mean over unmasked tokens)."""

    iteration: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    seconds: float
    skipped: bool = False
    loss_scale: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # an objective's named metrics (StepOutcome.metrics)
    in_loss: bool = True  # False: not part of the lm_loss average (StepOutcome.in_loss)


@dataclass
class MetricsLogger:
    """Accumulates step stats between log lines and writes every sink; rank 0 only."""

    run_dir: Path | None
    train_iters: int
    flops_per_token: float
    peak_tflops: float | None
    log_interval: int = 100
    tensorboard_dir: str | None = None
    wandb: dict[str, Any] | None = None
    enabled: bool = True
    nan_count: int = 0
    skipped_count: int = 0
    _window: list[StepStats] = field(default_factory=list)
    _logged_nan: int = 0  # nan_count / skipped_count at the last log line (its counts are per interval)
    _logged_skipped: int = 0
    _recent_step_s: deque = field(default_factory=lambda: deque(maxlen=50))
    _tb: Any = None
    _wandb_run: Any = None
    _start: float = field(default_factory=time.time)
    start_iteration: int = 0  # where this run (re)starts: records after it, from a run that crashed, go

    def __post_init__(self) -> None:
        self._logged_nan, self._logged_skipped = self.nan_count, self.skipped_count  # a resumed run's totals
        if not self.enabled:
            return
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for name in (METRICS_FILE, EVAL_FILE):
                drop_records_after(self.run_dir / name, self.start_iteration)
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.tensorboard_dir)
        if self.wandb is not None:
            self._wandb_run = _start_wandb(self.wandb)

    # ---------------------------------------------------------------- per step
    def record(self, stats: StepStats, nan: bool) -> dict[str, Any] | None:
        """Account one step; returns the logged record when this step is a log step."""
        if nan:
            self.nan_count += 1
        if stats.skipped:
            self.skipped_count += 1
        self._window.append(stats)
        self._recent_step_s.append(stats.seconds)
        if not self.enabled:
            return None
        self.heartbeat(stats.iteration, "running")
        if stats.iteration % max(1, self.log_interval) != 0 and stats.iteration != self.train_iters:
            return None
        return self._flush(stats.iteration)

    def _flush(self, iteration: int) -> dict[str, Any]:
        window, self._window = self._window, []
        secs = sum(s.seconds for s in window) or 1e-9
        tokens = sum(s.tokens for s in window)
        good = [s.loss for s in window if math.isfinite(s.loss) and not s.skipped and s.in_loss]
        loss = sum(good) / len(good) if good else float("nan")
        norms = [s.grad_norm for s in window if s.grad_norm is not None and math.isfinite(s.grad_norm)]
        last = window[-1]
        tokens_per_s = tokens / secs
        tflops = tokens_per_s * self.flops_per_token / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        step_s = sum(self._recent_step_s) / len(self._recent_step_s)
        eta = step_s * (self.train_iters - iteration)
        record = {
            "iteration": iteration,
            "loss": _num(loss),
            "lr": last.lr,
            "grad_norm": _num(norms[-1]) if norms else None,
            "tokens_per_s": round(tokens_per_s, 3),
            "tflops": round(tflops, 6),
            "mfu": _num(mfu),
            "nan_count": self.nan_count,
            "skipped_count": self.skipped_count,
            "step_time_s": round(secs / len(window), 6),
            "time": time.time(),
        }
        if last.loss_scale is not None:
            record["loss_scale"] = last.loss_scale
        extra_names = sorted({k for s in window for k in s.extra})
        for name in extra_names:  # averaged over the window's steps
            values = [s.extra[name] for s in window if name in s.extra and math.isfinite(s.extra[name])]
            record[name] = sum(values) / len(values) if values else None
        if self.run_dir is not None:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        parts = [
            # GPT-NeoX's labels (megatron/logging.py training_log) where it has the field, so users'
            # greps and parsers (`iteration.*lm_loss`, `lm_loss:\s*([0-9.E+-]+)`) read neoxt logs.
            f" iteration {iteration:8d}/{self.train_iters:8d}",
            f"elapsed time per iteration (ms): {1000 * secs / len(window):.1f}",
            f"learning rate: {last.lr:.3E}",
            f"lm_loss: {loss:.6E}",
            f"grad norm: {record['grad_norm']:.3f}" if record["grad_norm"] is not None else "grad norm: n/a",
            f"tokens/s: {tokens_per_s:,.0f}",
            f"TFLOP/s: {tflops:.3f}",
            f"MFU: {100 * mfu:.2f}%" if mfu is not None else "MFU: n/a",
        ]
        if last.loss_scale is not None:
            parts.append(f"loss scale: {last.loss_scale:.1f}")
        parts += [f"{name} {record[name]:.6E}" for name in extra_names if record[name] is not None]
        # Counted over this log interval, as upstream; metrics.jsonl keeps the run's running totals.
        parts += [
            f"number of skipped iterations: {self.skipped_count - self._logged_skipped:3d}",
            f"number of nan iterations: {self.nan_count - self._logged_nan:3d}",
            f"ETA: {_fmt_eta(eta)}",
        ]
        self._logged_skipped, self._logged_nan = self.skipped_count, self.nan_count
        print(" | ".join(parts), flush=True)
        self._emit(
            iteration,
            {
                "train/lm_loss": record["loss"],
                "learning_rate": last.lr,
                "train/grad_norm": record["grad_norm"],
                "runtime/tokens_per_sec": tokens_per_s,
                "runtime/flops_per_sec_per_gpu": tflops * 1e12,
                "runtime/mfu": mfu,
                "train/nan_count": self.nan_count,
                **{f"train/{name}": record[name] for name in extra_names},
            },
        )
        return record

    def record_eval(self, iteration: int, loss: float, tokens: int,
                    extra: dict[str, float] | None = None) -> dict[str, Any]:
        """One validation result; ``extra`` (an objective's metrics, e.g. accuracy) as ``valid_<name>``."""
        ppl = math.exp(min(loss, 80.0)) if math.isfinite(loss) else float("nan")
        record = {"iteration": iteration, "valid_loss": _num(loss), "valid_ppl": _num(ppl), "tokens": tokens, "time": time.time()}
        record.update({f"valid_{name}": _num(value) for name, value in (extra or {}).items()})
        if not self.enabled:
            return record
        if self.run_dir is not None:
            with open(self.run_dir / EVAL_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        print(f" validation results at iteration {iteration} | lm_loss value: {loss:.6E} | lm_loss_ppl value: {ppl:.6E} |",
              flush=True)
        self._emit(iteration, {"validation/lm_loss": record["valid_loss"], "validation/lm_loss_ppl": record["valid_ppl"],
                               **{f"validation/{name}": record[f"valid_{name}"] for name in extra or {}}})
        return record

    def record_task_scores(self, iteration: int, scores: dict[str, float]) -> None:
        """lm-eval results of evaluation during training (``eval_tasks``), as ``eval/<task>_<metric>``."""
        if not self.enabled or not scores:
            return
        if self.run_dir is not None:
            with open(self.run_dir / EVAL_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"iteration": iteration, **scores, "time": time.time()}) + "\n")
        print(f"eval tasks at iteration {iteration} | "
              + " | ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in scores.items()), flush=True)
        self._emit(iteration, scores)

    def _emit(self, iteration: int, scalars: dict[str, float | None]) -> None:
        clean = {k: v for k, v in scalars.items() if v is not None and math.isfinite(v)}
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, iteration)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(clean, step=iteration)

    # ---------------------------------------------------------------- lifecycle
    def heartbeat(self, iteration: int, status: str, reason: str | None = None) -> None:
        """Rewrite ``heartbeat.json``; a "failed" one carries ``reason`` (default: the exception being
        handled, if any)."""
        if not self.enabled or self.run_dir is None:
            return
        beat = {
            "iteration": iteration,
            "train_iters": self.train_iters,
            "time": time.time(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "status": status,
            "nan_count": self.nan_count,
        }
        # A failed run is closed from the trainer's `finally` while its exception propagates: record
        # why (e.g. "TrainingStopped: non-finite loss at iteration 4 (on_nan: stop)") for `neoxt status`.
        exc = sys.exc_info()[1]
        if status == "failed" and reason is not None:
            beat["reason"] = reason[:300]
        elif status == "failed" and exc is not None:
            beat["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        _write_json(self.run_dir / HEARTBEAT_FILE, beat)

    def close(self, iteration: int, status: str) -> None:
        """Flush pending steps (so the last iteration is always logged) and mark the heartbeat."""
        if self.enabled and self._window:
            self._flush(self._window[-1].iteration)
        self.heartbeat(iteration, status)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def wandb_settings(cfg: LoggingConfig, run_dir: Path | None) -> dict[str, Any] | None:
    if not cfg.use_wandb:
        return None
    return {
        "project": cfg.wandb_project,
        "group": cfg.wandb_group,
        "entity": cfg.wandb_team,
        "name": cfg.wandb_run_name,
        "host": cfg.wandb_host,
        "dir": str(run_dir) if run_dir is not None else None,
    }


def drop_records_after(path: Path, iteration: int) -> int:
    """Remove the records of iterations after ``iteration`` (and a torn last line) from a JSONL file.

    A run that crashed after its last checkpoint logged steps that the resumed run replays; without this
    ``metrics.jsonl`` would hold those iterations twice. Returns the number of lines removed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(record, dict) and isinstance(record.get("iteration"), int) and record["iteration"] > iteration):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def _start_wandb(settings: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "use_wandb: true, but the wandb package is not installed (pip install 'neoxt[wandb]')"
        ) from None
    if settings.get("host"):
        os.environ.setdefault("WANDB_BASE_URL", settings["host"])
    kwargs = {k: v for k, v in settings.items() if k in ("project", "group", "entity", "name", "dir") and v}
    return wandb.init(**kwargs)
