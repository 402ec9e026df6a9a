"""Pipeline parallel without full logits: the last stage's loss from the hidden states, projected 5
tokens at a time, trains exactly like the full-logits path, and never computes a [tokens, vocab] block.

One ``torchrun --nproc_per_node 2`` (gloo) runs ``dist_worker.run_pipeline_chunk_scenario`` for the
1F1B schedule and the interleaved one (two stages a rank, so the labels also reach a middle stage).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_worker  # noqa: E402
from test_parallel_equivalence import torchrun  # noqa: E402

pytestmark = pytest.mark.distributed
SCENARIOS = ["ppchunk:llama", "ppchunkint:olmo3"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ppchunk") / "losses.json"
    proc = torchrun(HERE / "dist_worker.py", [str(out), *SCENARIOS])
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chunked_pipeline_loss_equals_full_logits(scenario, results):
    got = results[scenario]
    assert "error" not in got, got.get("error")
    full, chunked = got["chunk0"], got["chunk5"]
    assert len(full["losses"]) == len(chunked["losses"]) == dist_worker.STEPS + 1
    # Same loss and gradients in fp32: the curves (4 SGD steps, then a forward-only pass) and the
    # pre-clipping gradient norms agree to rounding.
    assert chunked["losses"] == pytest.approx(full["losses"], abs=1e-5, rel=0)
    assert chunked["grad_norms"] == pytest.approx(full["grad_norms"], rel=1e-5)
    assert full["losses"][-1] < full["losses"][0]  # it trained


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chunked_pipeline_never_builds_full_logits(scenario, results):
    got = results[scenario]
    assert "error" not in got, got.get("error")
    # A micro-batch is 1 x 16 tokens: the full path computes [1, 16, vocab] logits (and their
    # gradient); the chunked one no [..., vocab] block of more than 5 rows.
    assert got["chunk0"]["vocab_rows"] == dist_worker.SEQ
    assert got["chunk5"]["vocab_rows"] == 5
