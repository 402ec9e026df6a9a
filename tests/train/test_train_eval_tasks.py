"""GPT-NeoX's evaluation during training: `eval_tasks` run through lm-eval every `eval_interval`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from trainkit import PatternSource, tiny_config

from neoxt.config.schema import EvaluationConfig, TokenizerConfig
from neoxt.train.loop import train
from neoxt.train.setup import TrainData

LMEVAL = Path(__file__).resolve().parents[1] / "data" / "lmeval"


def test_eval_tasks_run_at_eval_interval_and_are_logged(tmp_path, tiny_tokenizer_dir):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text((LMEVAL / "tiny_mc.yaml.in").read_text().replace("@DATA_DIR@", str(LMEVAL)))
    cfg = tiny_config(save=tmp_path / "run", train_iters=4, eval_interval=2)
    cfg = replace(
        cfg,
        model=replace(cfg.model, padded_vocab_size=384),
        tokenizer=TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir / "tokenizer.json")),
        evaluation=EvaluationConfig(eval_tasks=("tiny_mc",), eval_include_path=str(tasks), eval_limit=3),
    )
    lines: list[str] = []
    train(cfg, "", data=TrainData(PatternSource()), log=lines.append)

    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval/tiny_mc_acc" in r]
    assert [r["iteration"] for r in scored] == [2, 4]
    assert all(0.0 <= r["eval/tiny_mc_acc"] <= 1.0 for r in scored)
    results = json.loads((tmp_path / "run" / "eval_results_iter4.json").read_text())
    assert "tiny_mc" in results["results"]
