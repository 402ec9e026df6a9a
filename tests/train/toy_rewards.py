"""Toy rewards for the REINFORCE tests (named as ``toy_rewards:<function>`` in reinforce_reward)."""

from __future__ import annotations

TARGET = 100  # the token id whose count is the reward


def count_target(prompts, completions, completion_ids, **kwargs):
    """The number of TARGET tokens in each completion."""
    return [float(ids.count(TARGET)) for ids in completion_ids]


def mean_token_id(prompts, completion_ids, **kwargs):
    """The mean token id of each completion / 100: a dense reward every sample gets."""
    return [sum(ids) / max(len(ids), 1) / 100.0 for ids in completion_ids]
