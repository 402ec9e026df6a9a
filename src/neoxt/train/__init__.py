"""Training: ``neoxt train`` and ``neoxt demo``.

- ``loop.py``: the loop (``train(cfg)``): where a run starts (automatic exact resume from ``save``,
  finetune from ``load``), micro-batches and gradient accumulation, NaN policy, evaluation, signals.
- ``losses.py``: token cross-entropy as (sum, count) so the global batch sets the mean; DPO pieces.
- ``posttrain.py``: DPO / KTO objectives (SFT is the plain loss with label files).
- ``optim.py``, ``schedule.py``, ``precision.py``: GPT-NeoX optimizers, LR schedules, fp16/bf16.
- checkpoints: the format lives in ``neoxt.checkpoint`` (shared with convert, generate, evaluate).
- ``metrics.py``: console line, ``metrics.jsonl``, ``heartbeat.json``, TensorBoard, W&B.
- ``demo.py``: the shipped-corpus demo behind ``make demo``.
"""
