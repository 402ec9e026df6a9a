"""The fork's post-training keys: train_impl rm implies a value head; REINFORCE's keys are fields; its
online data-server keys are accepted (neoxt samples in process) only for train_impl: reinforce."""

from __future__ import annotations

import pytest

from neoxt.config import config_from_dict
from neoxt.errors import ConfigError


def test_rm_gets_a_value_head_unless_told_otherwise():
    assert config_from_dict({"train_impl": "rm"}).model.value_head
    assert not config_from_dict({"train_impl": "dpo"}).model.value_head
    assert not config_from_dict({"train_impl": "rm", "value_head": False}).model.value_head


def test_fork_reinforce_keys_resolve():
    cfg = config_from_dict({
        "train_impl": "reinforce", "dataset_impl": "online", "reinforce_leave_one_out": True,
        "fp32_reinforce": True, "kl_impl": "abs", "kl_div_beta": 0.02, "serve_model_weights": True,
        "online_dataserver_ports": [10000, 10001],
    })
    t = cfg.training
    assert (t.kl_impl, t.kl_div_beta, t.reinforce_leave_one_out, t.fp32_reinforce) == ("abs", 0.02, True, True)
    with pytest.raises(ConfigError, match="dataset_impl: online .* is for train_impl: reinforce"):
        config_from_dict({"dataset_impl": "online"})
    with pytest.raises(ConfigError, match="kl_impl"):
        config_from_dict({"train_impl": "reinforce", "kl_impl": "l2"})
