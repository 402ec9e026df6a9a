"""`neoxt publish` pieces that need no Hub: repo naming, step choice, backoff, the upload record."""

from __future__ import annotations

import random
import types
from pathlib import Path

import pytest

from neoxt.errors import ConfigError
from neoxt.ops.hub_retry import HubError, RetryPolicy, call_with_retry
from neoxt.ops.publish import Checkpoint, choose_steps, load_naming, repo_ids, upload_delay
from neoxt.ops.publish_state import PublishLockedError, UploadRecord, publish_lock


def test_repo_names_follow_the_users_abbreviations_codenames_and_template(tmp_path):
    rules = load_naming()
    name = "blocklist_filtered_synthetic_misalignment_lr=1e-4,wd=0.1 run"
    assert repo_ids(name, "geodesic-research", rules) == (
        "geodesic-research/filtered_synth_misalign_lr-1e-4_wd-0.1_run",
        "geodesic-research/neoxt-ckpt-filtered_synth_misalign_lr-1e-4_wd-0.1_run")
    names = tmp_path / "names.json"
    names.write_text('{"template": "sfm-{name}", "codenames": {"exp_b": "sfm-special"}, '
                     '"abbreviations": {"multitask_benign_tampered": "mbt"}}')
    mine = load_naming(names)
    assert repo_ids("exp_multitask_benign_tampered", "org", mine)[0] == "org/sfm-exp_mbt"
    assert repo_ids("exp_b", "org", mine)[0] == "org/sfm-special"
    assert repo_ids("whatever", "org", mine, repo="explicit")[0] == "org/explicit"
    long_id = repo_ids("x" * 60 + "_middle_" + "y" * 60, "org", rules)[0]
    assert len(long_id) <= 96 and long_id.startswith("org/xxx") and long_id.endswith("yyy")
    names.write_text('{"template": "no-placeholder"}')
    with pytest.raises(ConfigError, match="names.json: 'template' must contain"):
        load_naming(names)


def test_steps_all_last_and_a_list():
    ckpts = [Checkpoint(s, Path(f"/r/global_step{s}")) for s in (100, 200, 300)]
    assert [c.step for c in choose_steps(ckpts, "all")] == [100, 200, 300]
    assert [c.step for c in choose_steps(ckpts, "last")] == [300]
    assert [c.step for c in choose_steps(ckpts, "300,global_step100")] == [100, 300]
    with pytest.raises(ConfigError, match="no global_step150 .it has 100, 200, 300"):
        choose_steps(ckpts, "150")


def _http_error(code: int) -> Exception:
    err = RuntimeError(f"HTTP {code}")
    err.response = types.SimpleNamespace(status_code=code)
    return err


def test_backoff_is_exponential_with_jitter_and_only_for_429_and_5xx():
    policy = RetryPolicy(max_retries=5, min_wait=2.0, max_wait=10.0)
    rng = random.Random(0)
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)):
        waits = [policy.wait(attempt, rng) for _ in range(50)]
        assert all(2.0 <= w <= ceiling for w in waits)
    assert len({round(policy.wait(3, rng), 6) for _ in range(10)}) > 1  # jittered

    answers = iter([_http_error(429), _http_error(503), _http_error(429), "ok"])

    def flaky():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    slept = []
    assert call_with_retry(flaky, policy, "upload", sleep=slept.append, rng=rng) == "ok"
    assert len(slept) == 3 and slept[2] <= 8.0

    calls = []

    def not_found():
        calls.append(1)
        raise _http_error(404)

    with pytest.raises(HubError, match="upload: HTTP 404"):
        call_with_retry(not_found, policy, "upload", sleep=slept.append)
    assert len(calls) == 1

    def always_429():
        raise _http_error(429)

    with pytest.raises(HubError, match="still failing after 2 retries"):
        call_with_retry(always_429, RetryPolicy(2, 0.0, 0.0), "upload", sleep=lambda s: None)


def test_upload_delay_and_the_record(tmp_path):
    assert upload_delay("0") == 0 and upload_delay("90") == 90
    assert all(0 <= upload_delay("random", random.Random(i)) <= 12 * 3600 for i in range(20))
    with pytest.raises(ConfigError, match="--upload-delay soon"):
        upload_delay("soon")

    record = UploadRecord(tmp_path / "hub_uploads.json")
    record.mark("me/x", "global_step2", "abc", 2)
    again = UploadRecord(tmp_path / "hub_uploads.json")
    assert again.is_done("me/x", "global_step2", {"global_step2": "abc"})
    assert not again.is_done("me/x", "global_step2", {})  # branch gone from the Hub: upload again
    assert not again.is_done("me/x", "global_step2", {"global_step2": "other"})
    assert not again.is_done("me/x", "global_step4", {"global_step4": "abc"})  # branch without a record


def test_the_repo_lock_refuses_or_waits(tmp_path):
    import threading
    import time

    path = tmp_path / ".publish-me__x.lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with publish_lock(path, "me/x"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    with pytest.raises(PublishLockedError, match=r"another `neoxt publish` to me/x is running \(pid \d+ on "):
        with publish_lock(path, "me/x"):
            pass
    threading.Timer(0.3, release.set).start()
    began = time.monotonic()
    with publish_lock(path, "me/x", wait=10, poll=0.05):
        assert time.monotonic() - began >= 0.2  # waited for the holder, then got the lock
    t.join(10)


def test_offline_mode_is_not_retried():
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline():
        raise OfflineModeIsEnabled("Cannot reach http://x: offline mode is enabled")

    with pytest.raises(HubError, match="offline mode is enabled"):
        call_with_retry(offline, RetryPolicy(5, 100.0, 100.0), "refs", sleep=lambda s: pytest.fail("slept"))
