"""Reward models (train_impl: rm): pairwise loss on a value head, accuracy on held-out pairs, the HF
``*ForSequenceClassification`` export and ``neoxt score`` giving our scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from neoxt.config import config_from_dict
from neoxt.data.indexed import IndexedDatasetWriter
from neoxt.errors import ConfigError
from neoxt.model.value_head import score_sequences
from neoxt.train.loop import train

EOD, GOOD, BAD = 0, 150, 151


def _pair(rng: np.random.Generator) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen answer, rejected answer): the same answer with GOOD or BAD at one random place."""
    prompt = rng.integers(20, 60, int(rng.integers(3, 6))).tolist()
    answer = rng.integers(100, 140, 5).tolist()
    at = int(rng.integers(0, 5))
    return prompt, answer[:at] + [GOOD] + answer[at:], answer[:at] + [BAD] + answer[at:]


def _write(prefix, docs):
    with IndexedDatasetWriter(f"{prefix}_text_document", np.uint16) as t, \
            IndexedDatasetWriter(f"{prefix}_label_document", np.int32) as lab:
        for prompt, answer in docs:
            t.add_document(np.array(prompt + answer + [EOD], dtype=np.uint16))
            lab.add_document(np.array([-100] * len(prompt) + answer + [EOD], dtype=np.int32))
    return f"{prefix}_text_document", f"{prefix}_label_document"


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("rm")
    rng = np.random.default_rng(0)
    pairs = [_pair(rng) for _ in range(64)]
    held_out = [_pair(np.random.default_rng(100 + i)) for i in range(40)]
    return {"pos": _write(root / "pos", [(p, c) for p, c, _ in pairs]),
            "neg": _write(root / "neg", [(p, r) for p, _, r in pairs]),
            "held_out": held_out, "root": root, "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json")}


def _cfg(rm_data, save, **extra):
    p, n = rm_data["pos"], rm_data["neg"]
    d = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 32, "pos_emb": "rotary",
        "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "weight_decay": 0.0,
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_iters": 40,
        "dataset_impl": "pairwise", "pack_impl": "unpacked", "train_impl": "rm",
        "pos_train_data_paths": [p[0]], "neg_train_data_paths": [n[0]],
        "pos_train_label_data_paths": [p[1]], "neg_train_label_data_paths": [n[1]],
        "pos_valid_data_paths": [p[0]], "neg_valid_data_paths": [n[0]],
        "pos_valid_label_data_paths": [p[1]], "neg_valid_label_data_paths": [n[1]],
        "tokenizer_type": "HFTokenizer", "vocab_file": rm_data["vocab_file"], "eval_iters": 1, "eval_interval": 20,
        "log_interval": 1, "seed": 3, "index_cache_dir": str(rm_data["root"] / "cache"),
        "save": str(save), "checkpoint_factor": 40,
    }
    d.update(extra)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, rm_data):
    run = tmp_path_factory.mktemp("rm-run") / "run"
    result = train(_cfg(rm_data, run), None, log=lambda m: None)
    return run, result


def _held_out(rm_data) -> tuple[list[list[int]], list[list[int]]]:
    chosen = [p + c for p, c, _ in rm_data["held_out"]]
    rejected = [p + r for p, _, r in rm_data["held_out"]]
    return chosen, rejected


def test_rm_learns_the_preference_on_held_out_pairs(trained_rm, rm_data):
    import neoxt

    run, result = trained_rm
    assert result.losses[0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores pairs ~equally
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward"} <= set(rows[-1])
    assert rows[-1]["margin"] == pytest.approx(rows[-1]["chosen_reward"] - rows[-1]["rejected_reward"], abs=1e-5)
    valid = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [v["iteration"] for v in valid] == [20, 40] and valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert valid[-1]["valid_accuracy"] > 0.9 and valid[-1]["valid_margin"] > 0  # validation pairs, weighted per batch
    model = neoxt.load_model(run)
    assert model.cfg.value_head and model.lm_head.weight.shape[0] == 1
    chosen, rejected = _held_out(rm_data)
    c, r = score_sequences(model, chosen), score_sequences(model, rejected)
    accuracy = sum(a > b for a, b in zip(c, r)) / len(c)
    assert accuracy > 0.9, (accuracy, result.losses)


def test_rm_hf_export_and_score_command_give_our_scores(trained_rm, rm_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    import neoxt
    from neoxt.cli import main
    from neoxt.convert.hf import convert_neoxt_to_hf
    from neoxt.tokenizer import load_tokenizer

    run, _ = trained_rm
    ours = neoxt.load_model(run)
    out = convert_neoxt_to_hf(run, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForSequenceClassification"] and len(cfg["id2label"]) == 1
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    chosen, rejected = _held_out(rm_data)
    seqs = chosen[:6] + rejected[:6]
    with torch.no_grad():
        theirs = [float(hf(torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert theirs == pytest.approx(score_sequences(ours, seqs), abs=1e-5)
    back = neoxt.load_model(out)  # and the HF reward model reads back as ours (e.g. as a REINFORCE reward)
    assert back.cfg.value_head and score_sequences(back, seqs) == pytest.approx(theirs, abs=1e-5)

    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=rm_data["vocab_file"])
    records = [{"messages": [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": a}]}
               for a in ("The quick brown fox.", "Numbers like 12345.")] + [{"text": "A language model."}]
    src = tmp_path / "conversations.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["score", "--model", str(run), str(src), "--output", str(tmp_path / "scores.jsonl")]) == 0
    scored = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    ids = [tok.apply_chat_template(r["messages"]) for r in records[:2]] + [tok.encode(records[2]["text"],
                                                                                     add_special_tokens=False)]
    with torch.no_grad():
        hf_scores = [float(hf(torch.tensor([s])).logits[0, 0]) for s in ids]
    assert [s["score"] for s in scored] == pytest.approx(hf_scores, abs=1e-5)
    assert scored[0]["messages"] == records[0]["messages"]


def test_rm_from_a_language_model_keeps_its_body_and_refuses_non_pairwise_data(tmp_path, rm_data):
    import neoxt

    lm = _cfg(rm_data, tmp_path / "lm", train_impl="normal", train_iters=1, dataset_impl="gpt2",
              pack_impl="packed", train_data_paths=[rm_data["pos"][0]], checkpoint_factor=1)
    assert not lm.model.value_head
    train(lm, None, log=lambda m: None)
    rm = _cfg(rm_data, tmp_path / "rm", load=str(tmp_path / "lm"), finetune=True, train_iters=1)
    train(rm, None, log=lambda m: None)
    base, tuned = neoxt.load_model(tmp_path / "lm"), neoxt.load_model(tmp_path / "rm")
    assert tuned.lm_head.weight.shape == (1, 32) and base.lm_head is None  # tied LM head -> a new value head
    # One small step from the LM: the body moved only a little (it was loaded, not re-initialised).
    assert torch.allclose(base.embed.weight, tuned.embed.weight, atol=5e-3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    from neoxt.cli import main

    assert main(["score", "--model", str(tmp_path / "rm"), str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ConfigError, match="pairwise"):
        train(_cfg(rm_data, tmp_path / "x", dataset_impl="gpt2", pack_impl="packed",
                   train_data_paths=[rm_data["pos"][0]]), None, log=lambda m: None)


def test_rm_round_trips_through_gpt_neox_with_a_row_parallel_head(trained_rm, tmp_path):
    import neoxt
    from neoxt.cli import main

    run, _ = trained_rm
    back = tmp_path / "neox"
    assert main(["convert", "neoxt-to-neox", "--checkpoint", str(run), "--output-dir", str(back),
                 "--model-parallel-size", "2"]) == 0
    shards = [torch.load(back / "global_step40" / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"]
              for r in (0, 1)]
    heads = [next(v for k, v in s.items() if k.endswith("final_linear.weight")) for s in shards]
    assert [tuple(h.shape) for h in heads] == [(1, 16), (1, 16)]  # the fork's is_rm head splits the hidden dim
    assert main(["convert", "neox-to-neoxt", "--input-dir", str(back), "--output-dir", str(tmp_path / "again")]) == 0
    a, b = neoxt.load_model(run).state_dict(), neoxt.load_model(tmp_path / "again").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
