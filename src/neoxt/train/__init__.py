"""Training: ``neoxt train`` and ``neoxt demo``.

- ``loop.py``: ``train(cfg)``, the loop itself: global batch → step → evaluate → save → stop.
- ``setup.py``: everything built before the first step (process group, mesh, model, objective, data,
  optimizers, restore), in the order that matters.
- ``objectives/``: one object per ``train_impl`` (``lm.py`` LM/SFT, ``dpo.py``, ``kto.py``, ``pipeline.py``
  the pipeline schedule) behind the interface in ``objectives/base.py``; a registry in ``__init__.py``.
- ``step.py``: unscale, clip, finite check, NaN / fp16-overflow policy and counters, optimizer step.
- ``checkpointer.py``: where a run starts, what a checkpoint holds, save / restore / keep-last-N.
- ``evaluation.py``: validation loss and ``eval_tasks`` during training.
- ``losses.py``: token cross-entropy as (sum, count) so the global batch sets the mean; DPO pieces.
- ``optim.py``, ``schedule.py``, ``precision.py``, ``signals.py``: GPT-NeoX optimizers, LR schedules,
  fp16/bf16, the walltime-signal flag.
- ``watchdog.py``: ends a rank whose step makes no progress for ``step_timeout_s`` (a hung peer).
- checkpoints: the format lives in ``neoxt.checkpoint`` (shared with convert, generate, evaluate).
- ``metrics.py``: console line, ``metrics.jsonl``, ``heartbeat.json``, TensorBoard, W&B.
- ``demo.py``: the shipped-corpus demo behind ``make demo``.
"""
