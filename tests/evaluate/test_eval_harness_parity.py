"""Acceptance 2: `neoxt eval` on our (converted) model equals lm-eval's own `hf` backend on the HF dir."""

from __future__ import annotations

import json

import pytest
from evalfixtures import make_hf_model_dir, write_tasks

from neoxt.cli import main

TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("evalparity")
    hf_dir = make_hf_model_dir(tmp / "hf", tiny_tokenizer_dir, arch="neox")
    tasks = write_tasks(tmp / "tasks", tuple(TASKS))
    return tmp, hf_dir, tasks


@pytest.fixture(scope="module")
def hf_results(setup):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _, hf_dir, tasks = setup
    return lm_eval.simple_evaluate(model=HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu"), tasks=TASKS,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                   log_samples=True)


def _per_sample(results, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_neoxt_eval_matches_lm_eval_hf_backend(setup, hf_results, capsys):
    tmp, hf_dir, tasks = setup
    out = tmp / "ours.json"
    rc = main(["eval", "--model", str(hf_dir), "--tasks", *TASKS, "--include-path", str(tasks),
               "--output", str(out), "--log-samples", "--batch-size", "3", "--device", "cpu"])
    assert rc == 0
    assert "tiny_mc" in capsys.readouterr().out  # the printed table
    ours = json.loads(out.read_text())

    # Multiple choice: every (context, choice) log-likelihood and is_greedy, then the accuracy.
    theirs_mc, ours_mc = _per_sample(hf_results, "tiny_mc"), _per_sample(ours, "tiny_mc")
    assert len(ours_mc) == len(theirs_mc) == 8
    for (doc_a, resps_a), (doc_b, resps_b) in zip(ours_mc, theirs_mc):
        assert doc_a == doc_b
        for [(ll_a, greedy_a)], [(ll_b, greedy_b)] in zip(resps_a, resps_b):
            assert abs(float(ll_a) - float(ll_b)) <= 1e-4
            assert greedy_a == greedy_b
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == hf_results["results"]["tiny_mc"][metric]

    # Rolling log-likelihood (perplexity task) per document.
    ppl_ours, ppl_theirs = _per_sample(ours, "tiny_ppl"), _per_sample(hf_results, "tiny_ppl")
    assert len(ppl_ours) == len(ppl_theirs) == 8
    for (_, [[a]]), (_, [[b]]) in zip(ppl_ours, ppl_theirs):
        assert abs(float(a) - float(b)) <= 1e-4
    # Greedy generate_until through our KV-cache generator: the same strings.
    gen = _per_sample(ours, "tiny_gen")
    assert gen == _per_sample(hf_results, "tiny_gen")
    assert sum(len(r[0][0]) for _, r in gen) > 0, gen  # not trivially empty strings


def test_config_tokenizer_view_scores_like_the_hf_tokenizer(setup, hf_results):
    """A neoxt checkpoint's tokenizer (from the config) goes through TokenizerView: same numbers."""
    from neoxt import load_model
    from neoxt.evaluate.harness import run_eval
    from neoxt.tokenizer import load_tokenizer

    _, hf_dir, tasks = setup
    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(hf_dir / "tokenizer.json"))
    res = run_eval(load_model(hf_dir), tok, ["tiny_mc"], include_path=str(tasks), log_samples=True, batch_size=5)
    for (_, a), (_, b) in zip(_per_sample(res, "tiny_mc"), _per_sample(hf_results, "tiny_mc")):
        assert [abs(float(x[0][0]) - float(y[0][0])) <= 1e-4 for x, y in zip(a, b)] == [True] * 3
    assert res["results"]["tiny_mc"]["acc,none"] == hf_results["results"]["tiny_mc"]["acc,none"]


def test_chat_template_and_system_prompt_reach_the_requests(setup):
    from transformers import AutoTokenizer

    from neoxt import load_model
    from neoxt.evaluate.harness import run_eval

    _, hf_dir, tasks = setup
    res = run_eval(load_model(hf_dir), AutoTokenizer.from_pretrained(hf_dir), ["tiny_mc"], include_path=str(tasks),
                   apply_chat_template=True, system_prompt="Be brief.", log_samples=True, limit=2)
    context, continuation = res["samples"]["tiny_mc"][0]["arguments"][0]
    assert context.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nQuestion: ")
    assert context.endswith("<|assistant|>\n")


@pytest.mark.slow  # indexes all of lm-eval's built-in tasks (~10 s) before it can say "unknown"
def test_unknown_task_is_a_one_line_error(setup, capsys):
    _, hf_dir, tasks = setup
    rc = main(["eval", "--model", str(hf_dir), "--tasks", "no_such_task", "--include-path", str(tasks),
               "--device", "cpu"])
    assert rc == 2
    assert "unknown eval task 'no_such_task'" in capsys.readouterr().err


def test_eval_during_training_uses_the_config_keys(setup, tmp_path):
    from transformers import AutoTokenizer

    from neoxt import load_model
    from neoxt.config import config_from_dict
    from neoxt.evaluate.harness import eval_during_training

    _, hf_dir, tasks = setup
    cfg = config_from_dict({"eval_tasks": ["tiny_mc"], "eval_limit": 4, "eval_include_path": str(tasks),
                            "eval_results_prefix": "run1_"})
    model = load_model(hf_dir).train()
    metrics = eval_during_training(model, AutoTokenizer.from_pretrained(hf_dir), cfg, 50, out_dir=tmp_path)
    assert set(metrics) == {"eval/tiny_mc_acc", "eval/tiny_mc_acc_norm"}
    assert model.training  # back in training mode afterwards
    saved = json.loads((tmp_path / "run1_eval_results_iter50.json").read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == metrics["eval/tiny_mc_acc"]
    assert saved["n-samples"]["tiny_mc"]["effective"] == 4


def test_neoxt_checkpoint_eval_matches_hf_backend_on_its_export(tmp_path, tiny_tokenizer_dir):
    """The literal acceptance flow: a neoxt checkpoint, `neoxt convert neoxt-to-hf`, lm-eval `hf` on the export."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_from_dict, config_to_yaml, with_overrides
    from neoxt.model import Transformer

    cfg = config_from_dict({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                            "max_position_embeddings": 128, "pos_emb": "rotary", "rotary_pct": 0.25,
                            "gpt_j_residual": True, "no_weight_tying": True, "tokenizer_type": "HFTokenizer",
                            "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json")})
    cfg = with_overrides(cfg, model={"padded_vocab_size": 384})
    torch.manual_seed(1)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    save_checkpoint(tmp_path / "run", 5, {"model": model.state_dict()}, config_to_yaml(cfg))
    export = tmp_path / "hf"
    assert main(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "run"), "--output-dir", str(export)]) == 0
    tasks = write_tasks(tmp_path / "tasks", ("tiny_mc",))

    run_cfg = tmp_path / "eval.yml"
    run_cfg.write_text(f"load: {tmp_path / 'run'}\n")
    out = tmp_path / "ours.json"
    assert main(["eval", str(run_cfg), "--tasks", "tiny_mc", "--include-path", str(tasks), "--output", str(out),
                 "--log-samples", "--device", "cpu"]) == 0
    ours = json.loads(out.read_text())
    tokenizer = str(export) if (export / "tokenizer.json").is_file() else str(tiny_tokenizer_dir)
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(export), tokenizer=tokenizer, batch_size=4, device="cpu"), tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True)
    for (_, a), (_, b) in zip(_per_sample(ours, "tiny_mc"), _per_sample(theirs, "tiny_mc")):
        for [(ll_a, g_a)], [(ll_b, g_b)] in zip(a, b):
            assert abs(float(ll_a) - float(ll_b)) <= 1e-4 and g_a == g_b
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]


def test_hf_eos_ids_reads_generation_config_then_config(tmp_path):
    from neoxt.evaluate.harness import hf_eos_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert hf_eos_ids(tmp_path) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert hf_eos_ids(tmp_path) == (2, 7)
    assert hf_eos_ids(tmp_path / "missing") == ()
