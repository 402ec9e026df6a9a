"""benchmarks/mfu.py: row grid, selection, memory plan, table/JSON format, CPU refusals (no GPU here).

The GPU-only parts (float8 GEMMs, the torchtitan peer) must refuse in one line on CPU and still
appear in the table; the neoxt rows run end to end on CPU with ``--tiny``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neoxt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mfu = _load("mfu")


def test_rows_cover_the_issue_grid_bf16_first_both_sides():
    rows = mfu.plan_rows(["llama-1.1b", "llama-7b"], [2048, 8192], list(mfu.FLOAT8), peer=True)
    keys = [r.key for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 2 * 3 * 2  # shapes x seqs x float8 x sides
    assert keys[:4] == ["neoxt/llama-1.1b/2048/off", "torchtitan/llama-1.1b/2048/off",
                        "neoxt/llama-7b/2048/off", "torchtitan/llama-7b/2048/off"]
    assert all(r.float8 == "off" for r in rows[:8]) and all(r.float8 != "off" for r in rows[8:])
    assert keys[8:12] == ["neoxt/llama-1.1b/2048/tensorwise", "torchtitan/llama-1.1b/2048/tensorwise",
                          "neoxt/llama-1.1b/2048/rowwise", "torchtitan/llama-1.1b/2048/rowwise"]
    assert keys[-1] == "torchtitan/llama-7b/8192/rowwise"
    assert [r.side for r in mfu.plan_rows(["llama-7b"], [2048], ["off"], peer=False)] == ["neoxt"]


def test_row_selection_by_pattern_keeps_plan_order_and_refuses_a_pattern_matching_nothing():
    rows = mfu.plan_rows(["llama-1.1b", "llama-7b"], [2048, 8192], list(mfu.FLOAT8), peer=True)
    got = [r.key for r in mfu.select_rows(rows, ["neoxt/llama-7b/8192/*", "*/llama-1.1b/2048/off"])]
    assert got == ["neoxt/llama-1.1b/2048/off", "torchtitan/llama-1.1b/2048/off", "neoxt/llama-7b/8192/off",
                   "neoxt/llama-7b/8192/tensorwise", "neoxt/llama-7b/8192/rowwise"]
    assert mfu.select_rows(rows, None) == rows
    with pytest.raises(ConfigError, match="matches no row"):
        mfu.select_rows(rows, ["torchtitan/llama-7b/4096/off"])


def test_7b_plan_fits_one_h200_with_ac_and_falls_back_to_fewer_layers_on_a_smaller_device():
    shape = mfu.shapes(False)["llama-7b"]
    assert shape.ac and 6.5e9 < mfu.num_params(shape.cfg) < 7e9
    h200 = 143771 * 2**20  # what nvidia-smi reports there
    for seq in (2048, 8192):
        batch = shape.tokens // seq
        assert mfu.estimate_bytes(shape.cfg, batch, seq, ac=True) < h200
        assert mfu.fit_layers(shape.cfg, batch, seq, True, h200) == 32
    # Without AC the activations of 32 layers do not fit next to the 20 B/param of states.
    assert mfu.fit_layers(shape.cfg, 1, 8192, False, h200) < 32
    layers = mfu.fit_layers(shape.cfg, 1, 8192, True, 80 * GIB)  # an 80 GB card: fewer layers, same width
    assert 10 < layers < 32
    assert mfu.estimate_bytes(mfu.with_layers(shape.cfg, layers), 1, 8192, True) <= 80 * GIB
    one_b = mfu.shapes(False)["llama-1.1b"]
    assert mfu.fit_layers(one_b.cfg, one_b.tokens // 8192, 8192, one_b.ac, h200) == one_b.cfg.num_layers


def test_torchtitan_ffn_rule_gives_our_exact_ffn_width():
    peer = _load("titan_peer")
    shapes = [s.cfg for s in mfu.shapes(False).values()] + [s.cfg for s in mfu.shapes(True).values()]
    for cfg in shapes + [mfu.preset("olmo3-7b")]:
        args = peer.ffn_args(cfg.hidden_size, cfg.intermediate_size)
        assert peer.titan_ffn_width(cfg.hidden_size, **args) == cfg.intermediate_size
    assert peer.titan_ffn_width(2048, 256, None) == 5632  # torchtitan's own default rule, for reference


def test_torchtitan_peer_gets_the_same_dimensions():
    cfg = mfu.shapes(False)["llama-1.1b"].cfg
    dims = mfu.titan_dims(mfu.with_layers(cfg, 11))
    assert dims == {"hidden_size": 2048, "num_layers": 11, "num_attention_heads": 32, "num_kv_heads": 4,
                    "intermediate_size": 5632, "vocab_size": 32000, "tied": False, "norm_eps": 1e-5,
                    "rope_theta": 10000.0}


def test_time_budget_skips_a_row_that_would_not_finish():
    row = mfu.Row("neoxt", "llama-7b", 8192, "off")
    done = [{"side": "neoxt", "shape": "llama-7b", "status": "ok", "wall_s": 70.0},
            {"side": "torchtitan", "shape": "llama-7b", "status": "ok", "wall_s": 200.0}]
    assert mfu.over_budget(row, done, left=80.0, guess=90.0) is None
    assert "not run: 60s of the time budget left, a row takes ~70s" == mfu.over_budget(row, done, 60.0, 90.0)
    assert "~90s" in mfu.over_budget(mfu.Row("neoxt", "llama-1.1b", 2048, "off"), done, 60.0, 90.0)


def test_a_failing_row_is_recorded_and_the_rest_still_run(monkeypatch, tmp_path, capsys):
    """One broken row must not lose the table; a row past the time budget is listed as not run."""
    table = mfu.shapes(True)
    rows = mfu.plan_rows(["llama-tiny"], [64, 128], ["off"], peer=False)
    calls = []

    def fake_measure(row, shape, args, device):
        calls.append(row.key)
        if row.seq == 64:
            raise RuntimeError("boom\nsecond line")
        return {**mfu.planned(row, shape, args), "status": "ok", "note": "", "step_s": 0.5, "peak_mem_gib": None,
                "flops_per_token": 1e6, "params_b": 1e-4}

    monkeypatch.setattr(mfu, "measure_neoxt", fake_measure)
    monkeypatch.setattr(mfu.dist, "get_world_size", lambda: 1)
    args = mfu.parse(["--tiny", "--json", str(tmp_path / "r.json"), "--peak-tflops", "1"])
    results = mfu.run_rows(rows, table, args, mfu.torch.device("cpu"))
    assert calls == ["neoxt/llama-tiny/64/off", "neoxt/llama-tiny/128/off"]
    assert results[0]["status"] == "failed" and results[0]["note"] == "RuntimeError: boom"
    assert results[0]["micro_batch"] == 4 and results[0]["layers"] == 2
    assert results[1]["status"] == "ok" and results[1]["tokens_per_s"] == 2 * 128 / 0.5
    assert [r["key"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]] == [r.key for r in rows]
    args.budget_s = 1e-6
    skipped = mfu.run_rows(rows, table, args, mfu.torch.device("cpu"))
    assert [r["status"] for r in skipped] == ["skipped", "skipped"] and len(calls) == 2
    assert "RuntimeError: boom" in capsys.readouterr().err  # the traceback, for the log


def _row(side, shape, seq, f8, status="ok", tps=1000.0, note=""):
    r = {"side": side, "shape": shape, "seq": seq, "float8": f8, "key": f"{side}/{shape}/{seq}/{f8}",
         "status": status, "note": note, "micro_batch": 1, "ac": True, "layers": 24, "of_layers": 32}
    if status == "ok":
        r.update(tokens_per_s=tps, tflops_per_device=400.0, mfu=400 / 989, peak_mem_gib=120.5)
    return r


def test_markdown_table_pairs_the_sides_and_lists_notes():
    text = mfu.markdown([
        _row("neoxt", "llama-7b", 8192, "off", tps=3000.0, note="out of memory at 32 layers: measured with 24 of 32"),
        _row("torchtitan", "llama-7b", 8192, "off", tps=2500.0),
        _row("neoxt", "llama-7b", 8192, "tensorwise", status="skipped", note="not run: 5s of the time budget left"),
    ])
    lines = text.splitlines()
    assert lines[0].startswith("| shape | layers | seq |") and "torchtitan tokens/s" in lines[0]
    assert lines[2] == ("| llama-7b | 24/32 | 8192 | 1 | on | off | 3,000 | 400.0 | 40.4% | 120.5 "
                        "| 2,500 | 400.0 | 40.4% | 120.5 | 1.20x |")
    assert lines[3].startswith("| llama-7b | 24/32 | 8192 | 1 | on | tensorwise | not run |")
    assert "| — |" in lines[3]  # no torchtitan row in the results
    assert "- neoxt/llama-7b/8192/off: out of memory at 32 layers: measured with 24 of 32" in lines
    assert "- neoxt/llama-7b/8192/tensorwise: not run: 5s of the time budget left" in lines


def test_titan_peer_refuses_without_a_gpu_in_one_line(capsys):
    peer = _load("titan_peer")
    code = peer.main(["--model-json", "{}", "--seq", "64", "--micro-batch", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_peer_failure_line_skips_torchrun_boilerplate_and_a_hung_peer_is_killed():
    text = """[rank0]: Traceback (most recent call last):
[rank0]:   File "titan_peer.py", line 9, in run
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
E1201 torch/distributed/elastic/multiprocessing/api.py failed (exitcode: 1)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""
    assert mfu.error_line(text) == "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert mfu.error_line("just this\n") == "just this" and mfu.error_line("") == "no output"
    assert mfu.run_group([sys.executable, "-c", "print('hi')"], 60) == (0, "hi\n", "")
    code, _, _ = mfu.run_group([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], 2)
    assert code is None and mfu._PEERS == []


def test_sigterm_ends_the_running_peer_group(tmp_path):
    """`timeout` stops mfu.py with SIGTERM; the torchrun peer runs in its own session and must go too."""
    pid_file, child, parent = tmp_path / "peer.pid", tmp_path / "child.py", tmp_path / "parent.py"
    child.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    parent.write_text(
        f"import signal, sys, threading\nsys.path.insert(0, {str(REPO / 'benchmarks')!r})\nimport mfu\n"
        "signal.signal(signal.SIGTERM, mfu._stop)\n"
        "threading.Timer(3, lambda: signal.raise_signal(signal.SIGTERM)).start()\n"
        f"mfu.run_group([sys.executable, {str(child)!r}], 60)\n")
    proc = subprocess.run([sys.executable, str(parent)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"peer {pid} still running after SIGTERM")


def _run(tmp_path, *extra):
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "mfu.py"), "--tiny", "--steps", "1", "--warmup", "1",
         "--peak-tflops", "1.0", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_tiny_cpu_rows_json_and_table_with_gpu_rows_refused(tmp_path):
    out, md = tmp_path / "mfu.json", tmp_path / "mfu.md"
    proc = _run(tmp_path, "--no-compile", "--seqs", "64", "--peer", "torchtitan", "--json", str(out),
                "--markdown", str(md), "--rows", "*/llama-tiny/64/off", "neoxt/*/rowwise")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["peak_tflops"] == 1.0
    rows = {r["key"]: r for r in data["rows"]}
    assert list(rows) == ["neoxt/llama-tiny/64/off", "torchtitan/llama-tiny/64/off", "neoxt/llama-tiny/64/rowwise"]
    ours = rows["neoxt/llama-tiny/64/off"]
    assert ours["status"] == "ok" and ours["tokens_per_s"] > 0 and 0 < ours["mfu"] < 1
    assert ours["micro_batch"] == 4 and ours["layers"] == 2 and ours["loss"] > 0
    assert rows["torchtitan/llama-tiny/64/off"]["status"] == "refused"
    assert "needs a CUDA GPU" in rows["torchtitan/llama-tiny/64/off"]["note"]
    assert rows["neoxt/llama-tiny/64/rowwise"]["status"] == "refused"
    assert "float8_recipe: rowwise needs a CUDA GPU" in rows["neoxt/llama-tiny/64/rowwise"]["note"]
    table = md.read_text()
    assert table in proc.stdout and "| llama-tiny | 2 | 64 | 4 | off | off |" in table
    assert "| refused |" in table
    refusals = [ln for ln in proc.stdout.splitlines() if ": refused:" in ln or " refused: " in ln]
    assert len(refusals) == 2  # one line each


def test_list_and_bad_selection_exit_cleanly(capsys):
    assert mfu.main(["--tiny", "--list", "--peer", "torchtitan", "--seqs", "64"]) == 0
    assert capsys.readouterr().out.split() == [
        "neoxt/llama-tiny/64/off", "torchtitan/llama-tiny/64/off", "neoxt/llama-tiny/64/tensorwise",
        "torchtitan/llama-tiny/64/tensorwise", "neoxt/llama-tiny/64/rowwise", "torchtitan/llama-tiny/64/rowwise"]
    assert mfu.main(["--tiny", "--rows", "nothing/*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no row" in err[0]
    assert mfu.main(["--tiny", "--shapes", "llama-9b"]) == 2
    assert "unknown llama-9b" in capsys.readouterr().err


def test_gpu_kit_prints_one_short_command_that_installs_the_wheels_and_runs_every_row():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-kit.sh"), "--command"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip()
    assert len(cmd.splitlines()) == 1 and len(cmd) <= 2000  # the device tool's limit
    assert cmd.startswith("python3 -m pip install -q --no-index --no-deps") and "--target /tmp/site .whl/*.whl" in cmd
    assert "export PYTHONPATH=/tmp/site:$PWD/src" in cmd and "PYTHONUNBUFFERED=1" in cmd
    assert "benchmarks/mfu.py --peer torchtitan --budget-s" in cmd and "--json $OUT/" in cmd and "tee $OUT/" in cmd
    wheels = (REPO / "scripts" / "gpu-kit.sh").read_text().split("WHEELS=(")[1].split(")")[0].split()
    names = [w.split("==")[0].lower().replace("-", "_") for w in wheels]
    assert all("==" in w for w in wheels) and len(names) == len(set(names))  # pinned, one version each
    assert {"torchao", "torchtitan", "datasets"} <= set(names)
    assert "torchtitan==0.2.2" in wheels  # 0.3.0 needs a torch newer than the GPU image's 2.11
    assert "    " + cmd + "\n" in (REPO / "benchmarks" / "REPORT.md").read_text()  # the report shows this very command


@pytest.mark.slow
def test_mfu_benchmark_tiny_cpu_compiled(tmp_path):
    out = tmp_path / "mfu.json"
    proc = _run(tmp_path, "--shapes", "llama-tiny", "gpt-neox-tiny", "--seqs", "128", "--float8", "off",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["compile"] is True
    assert [r["key"] for r in rows] == ["neoxt/llama-tiny/128/off", "neoxt/gpt-neox-tiny/128/off"]
    for r in rows:
        assert r["status"] == "ok"
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and 0 < r["mfu"] < 1
