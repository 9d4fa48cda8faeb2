"""config.json parsing: both rope spellings, and clear errors for what shoal cannot run."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError
from shoal.models.hf_config import parse_model_config

BASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def test_original_rope_scaling_spelling():
    raw = dict(BASE, rope_theta=50000.0, rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0,
                                                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096})
    rope = parse_model_config(raw).rope
    assert (rope.type, rope.theta, rope.factor, rope.original_max_position_embeddings) == ("yarn", 50000.0, 40, 4096)


def test_transformers5_rope_parameters_spelling():
    raw = dict(BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})
    rope = parse_model_config(raw).rope
    assert (rope.type, rope.theta, rope.factor) == ("llama3", 500000.0, 8.0)


def test_eos_ids_and_defaults():
    config = parse_model_config(dict(BASE, eos_token_id=[1, 7]))
    assert config.eos_token_ids == [1, 7]
    assert config.num_key_value_heads == 4 and config.head_dim == 16


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"architectures": None}, "architectures"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ],
)
def test_config_errors(change, needle):
    raw = dict(BASE)
    raw.update(change)
    with pytest.raises(ConfigError, match=needle):
        parse_model_config(raw)
