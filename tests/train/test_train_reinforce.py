"""Online REINFORCE (train_impl: reinforce): sampling from the current weights, a toy reward that
rises, the KL term, exact resume, the three reward sources and the two prompt sources."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
import toy_rewards
from trainkit import train_killed_after

from conftest import CORPUS
from neoxt.config import config_from_dict
from neoxt.data.indexed import IndexedDatasetWriter
from neoxt.errors import ConfigError, DataError
from neoxt.train.loop import train
from neoxt.train.rewards import Samples, build_reward, leave_one_out


@pytest.fixture(scope="module")
def rl(tmp_path_factory, tiny_tokenizer_dir):
    """A JSONL of prompts and a starting model (one LM step on the corpus) to finetune from."""
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.tokenize import preprocess

    root = tmp_path_factory.mktemp("reinforce")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": s}) + "\n" for s in sorted(set(CORPUS))))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in CORPUS))
    vocab = str(tiny_tokenizer_dir / "tokenizer.json")
    tok = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=vocab)
    prefix = preprocess([str(root / "corpus.jsonl")], str(root / "corpus"), tok, keys=("text",),
                        append_eod=True).outputs["text"]
    info = {"root": root, "vocab_file": vocab, "prompts": str(root / "prompts.jsonl")}
    base = _cfg(info, root / "base", train_impl="normal", train_iters=1, reinforce_prompts=None,
                train_data_paths=[prefix], split="100,0,0", checkpoint_factor=1)
    train(base, None, log=lambda m: None)
    return {**info, "base": str(root / "base")}


def _cfg(rl, save, **extra):
    d = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}},
        "weight_decay": 0.0, "lr_decay_style": "constant",
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": 20,
        "train_impl": "reinforce", "reinforce_reward": "toy_rewards:count_target",
        "reinforce_prompts": rl["prompts"], "reinforce_samples": 4, "reinforce_max_new_tokens": 8,
        "reinforce_leave_one_out": True, "kl_impl": "mse", "kl_div_beta": 0.05,
        "tokenizer_type": "HFTokenizer", "vocab_file": rl["vocab_file"], "eval_iters": 0, "eval_interval": 5,
        "log_interval": 1, "seed": 3, "save": str(save), "checkpoint_factor": 5,
        "index_cache_dir": str(rl["root"] / "cache"),
    }
    d.update(extra)
    return config_from_dict(d)


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_toy_reward_rises_with_the_kl_term_logged_and_the_run_resumes_exactly(tmp_path, rl):
    cfg = _cfg(rl, tmp_path / "straight", load=rl["base"], finetune=True)
    ref = train(cfg, None, log=lambda m: None)
    rows = _metrics(tmp_path / "straight")
    rewards, kls = [r["reward"] for r in rows], [r["kl"] for r in rows]
    # The stated margin: the mean count of the target token per 8-token completion rises by more than
    # 1.5 between the first and the last 4 steps (it starts near 8/320).
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 1.5, rewards
    assert kls[0] == 0.0 and kls[-1] > 0.01, kls  # policy == reference at the first step, then it moves away
    assert all(math.isfinite(x) for x in ref.losses)
    samples = sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir())
    assert samples == [f"samples_{n:07d}.jsonl" for n in (5, 10, 15, 20)]
    logged = [json.loads(x) for x in (tmp_path / "straight" / "samples" / samples[-1]).read_text().splitlines()]
    assert len(logged) == 5 * 4 * 4 and {x["iteration"] for x in logged} == set(range(16, 21))
    last = [x["reward"] for x in logged if x["iteration"] == 20]
    assert sum(last) / len(last) == pytest.approx(rewards[-1])  # one global batch on one rank

    cut = _cfg(rl, tmp_path / "cut", load=rl["base"], finetune=True)
    first = train_killed_after(12, cut, None, log=lambda m: None)
    second = train(cut, None, log=lambda m: None)
    assert second.start_iteration == 10
    assert first.losses[:10] + second.losses == ref.losses  # sampling, rewards and updates all identical
    assert [r["reward"] for r in _metrics(tmp_path / "cut")][-10:] == rewards[-10:]
    for name in samples:  # the killed run's samples after the checkpoint were dropped, then rewritten alike
        assert (tmp_path / "cut" / "samples" / name).read_text() == (tmp_path / "straight" / "samples" / name).read_text()


@pytest.mark.parametrize("kl_impl", ["abs", "kl", "full"])
def test_each_kl_impl_starts_at_zero_and_trains(tmp_path, rl, kl_impl):
    cfg = _cfg(rl, tmp_path / kl_impl, train_iters=3, kl_impl=kl_impl, fp32_reinforce=kl_impl != "full",
               reinforce_leave_one_out=False, checkpoint_factor=None)
    r = train(cfg, None, log=lambda m: None)
    rows = _metrics(tmp_path / kl_impl)
    assert rows[0]["kl"] == 0.0 and all(math.isfinite(x) for x in r.losses)
    assert rows[-1]["kl"] != 0.0


def test_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0], dtype=torch.float64)
    assert leave_one_out(r, 3).tolist() == pytest.approx([-1.5, 0.0, 1.5, 6.0, -3.0, -3.0])


class _Rewards(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = {"rewards": [float(len(c)) for c in body["completions"]]}
        if body["prompts"][0] == "wrong count":
            answer = {"rewards": [1.0]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_reward_sources_http_model_and_function(tmp_path, rl):
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_to_yaml
    from neoxt.config.schema import ModelConfig, RunConfig
    from neoxt.model import Transformer
    from neoxt.model.value_head import score_sequences

    samples = Samples([[5, 6], [5, 6]], [[100, 7, 100], [8]], ["ab", "ab"], ["xyz", "q"])
    assert build_reward("toy_rewards:count_target", torch.device("cpu"))(samples) == [2.0, 0.0]
    server = HTTPServer(("127.0.0.1", 0), _Rewards)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/score"
        assert build_reward(url, torch.device("cpu"))(samples) == [3.0, 1.0]
        with pytest.raises(DataError, match="returned 1 rewards for 2"):
            build_reward(url, torch.device("cpu"))(Samples([[1]] * 2, [[2]] * 2, ["wrong count"] * 2, ["a"] * 2))
        r = train(_cfg(rl, tmp_path / "http", train_iters=2, reinforce_reward=url), None, log=lambda m: None)
        assert all(math.isfinite(x) for x in r.losses)
        logged = [json.loads(x) for x in (tmp_path / "http" / "samples" / "samples_0000005.jsonl").read_text().splitlines()]
        assert all(x["reward"] == len(x["completion"]) for x in logged)
    finally:
        server.shutdown()

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      padded_vocab_size=384, attention_types=("global",), value_head=True)
    torch.manual_seed(0)
    rm = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "rm", 0, {"model": rm.state_dict()}, config_to_yaml(RunConfig(model=cfg)))
    (tmp_path / "rm" / "latest").write_text("global_step0")
    scores = build_reward(str(tmp_path / "rm"), torch.device("cpu"))(samples)
    assert scores == pytest.approx(score_sequences(rm, [[5, 6, 100, 7, 100], [5, 6, 8]]), abs=1e-6)
    with pytest.raises(ConfigError, match="cannot load 'toy_rewards:nope'"):
        build_reward("toy_rewards:nope", torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs reinforce_reward"):
        train(_cfg(rl, tmp_path / "x", reinforce_reward=None), None, log=lambda m: None)
    assert toy_rewards.TARGET == 100


def test_prompts_from_an_indexed_dataset_are_the_documents_prompt_parts(tmp_path, rl):
    from neoxt.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=rl["vocab_file"])
    prompts = ["The quick brown fox", "Hello world!", "A language model", "Numbers like"]
    prefix = tmp_path / "sft"
    with IndexedDatasetWriter(f"{prefix}_text_document", np.uint16) as t, \
            IndexedDatasetWriter(f"{prefix}_label_document", np.int32) as lab:
        for p in prompts:
            ids, answer = tok.encode(p, add_special_tokens=False), tok.encode(" jumps.", add_special_tokens=False)
            t.add_document(np.array(ids + answer + [0], dtype=np.uint16))
            lab.add_document(np.array([-100] * len(ids) + answer + [0], dtype=np.int32))
    cfg = _cfg(rl, tmp_path / "run", train_iters=2, reinforce_prompts=None, pack_impl="unpacked",
               train_data_paths=[f"{prefix}_text_document"], train_label_data_paths=[f"{prefix}_label_document"],
               valid_data_paths=[f"{prefix}_text_document"], valid_label_data_paths=[f"{prefix}_label_document"],
               eval_interval=1, eval_iters=1)
    train(cfg, None, log=lambda m: None)
    valid = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [v["iteration"] for v in valid] == [1, 2] and all(math.isfinite(v["valid_loss"]) for v in valid)
    assert all(0.0 <= v["valid_reward"] <= 8.0 and "valid_kl" in v for v in valid)
    logged = [json.loads(x) for n in (1, 2)
              for x in (tmp_path / "run" / "samples" / f"samples_{n:07d}.jsonl").read_text().splitlines()]
    # Each completion follows exactly a document's prompt part; validation's samples are not logged.
    assert len(logged) == 2 * 4 * 4 and {x["prompt"] for x in logged} <= set(prompts)
    assert len({x["prompt"] for x in logged}) >= 3
