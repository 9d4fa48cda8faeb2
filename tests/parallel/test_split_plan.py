"""Splits: proportional to speed or explicit, and clear errors when a split cannot fit the model."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError
from shoal.models.hf_config import load_model_config
from shoal.parallel.config import ParallelConfig
from shoal.parallel.split import check_tensor_split, expert_split, layer_split, proportional_split


def test_proportional_split_follows_speed_and_keeps_one_each():
    assert proportional_split(24, [1, 1]) == [12, 12]
    assert proportional_split(8, [3, 1]) == [6, 2]
    assert proportional_split(3, [100, 1]) == [2, 1]
    assert sum(proportional_split(61, [2.5, 1.0, 1.7])) == 61


def test_explicit_and_measured_splits(checkpoint):
    config = load_model_config(checkpoint("deepseek-v3")[0])
    assert layer_split(config, ParallelConfig(pp=2, pp_layers="1,2")) == [1, 2]
    assert layer_split(config, ParallelConfig(pp=2, pp_layers="auto"), speeds=[1.0, 2.0]) == [1, 2]
    assert expert_split(8, ParallelConfig(ep=2, ep_weights="3,1")) == [6, 2]
    with pytest.raises(ConfigError, match="adds up to 4"):
        layer_split(config, ParallelConfig(pp=2, pp_layers="2,2"))


def test_bad_splits_say_what_to_change(checkpoint):
    with pytest.raises(ConfigError, match="--tp 3 must divide"):
        check_tensor_split(load_model_config(checkpoint("llama")[0]), 3)
    with pytest.raises(ConfigError, match="give --ep equal to --tp"):
        ParallelConfig(tp=2, ep=4)
    with pytest.raises(ConfigError, match="lists 3 stages"):
        ParallelConfig(pp=2, pp_layers="1,1,1")


def test_llm_rejects_a_split_before_starting_processes(checkpoint):
    from shoal import LLM

    with pytest.raises(ConfigError, match="has none"):
        LLM(checkpoint("llama")[0], device="cpu", ep=2, progress=False)
