"""``python -m neoxt.distributed.agent ARGS``: torchrun (same arguments) that exits 0 after a clean stop.

Why: with ``--signals-to-handle ...SIGUSR1`` torchrun forwards the walltime warning to the training
processes, waits for them (``--shutdown-timeout``) and then re-raises the signal as an exception, so
it exits 1 even when every worker saved its checkpoint and exited 0 — and SLURM marks the job FAILED.
This wrapper records the workers' exit codes as torchrun closes them and exits 0 exactly when the
stop was caused by one of the checkpoint signals and every worker exited 0. Anything else (a worker
that crashed, was killed after the timeout, or another signal) keeps torchrun's failure.
"""

from __future__ import annotations

import signal
import sys

# What the trainer turns into "save a checkpoint and exit 0".
CHECKPOINT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed.elastic.multiprocessing.api as mp_api
    from torch.distributed.run import main as torchrun

    exit_codes: dict[int, int | None] = {}
    # torchrun internals (private): if a later torch moves them, behave exactly like torchrun.
    original_close = getattr(getattr(mp_api, "SubprocessContext", None), "_close", None)

    def close_and_record(self, death_sig, timeout=30):
        original_close(self, death_sig, timeout)
        for local_rank, handler in getattr(self, "subprocess_handlers", {}).items():
            exit_codes[local_rank] = handler.proc.poll()

    if original_close is not None:
        mp_api.SubprocessContext._close = close_and_record
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except mp_api.SignalException as exc:
        clean = bool(exit_codes) and all(code == 0 for code in exit_codes.values())
        if exc.sigval in CHECKPOINT_SIGNALS and clean:
            print(
                f"neoxt: {exc.sigval.name} forwarded to {len(exit_codes)} training process(es); "
                "all exited 0 after saving",
                file=sys.stderr,
                flush=True,
            )
            return 0
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
