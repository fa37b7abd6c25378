"""U-AND configs are strict models: every bad value is one ConfigError line naming its field."""

import pytest

from saelab.errors import ConfigError
from saelab.uand import DataConfig, ModelConfig, TrainConfig

BAD = [
    # wrong types: no silent casts of strings, bools or fractions into counts
    (DataConfig, {"m": "32"}, "'m'"),
    (DataConfig, {"s": 2.5}, "'s'"),
    (DataConfig, {"seed": "x"}, "'seed'"),
    (DataConfig, {"op": 3}, "'op'"),
    (DataConfig, {"noise": "a lot"}, "'noise'"),
    (ModelConfig, {"d": True}, "'d'"),
    (ModelConfig, {"scale": "big"}, "'scale'"),
    (ModelConfig, {"frozen": "W"}, "'frozen'"),
    (TrainConfig, {"batch_size": 1.9}, "'batch_size'"),
    (TrainConfig, {"steps": True}, "'steps'"),
    (TrainConfig, {"lr": [0.1]}, "'lr'"),
    # out of range
    (DataConfig, {"m": 1}, "'m'"),
    (DataConfig, {"s": 0}, "'s'"),
    (DataConfig, {"noise": float("nan")}, "'noise'"),
    (DataConfig, {"m": 2, "s": 1, "circuit_op": "or"}, "'circuit_op'"),
    (ModelConfig, {"d2": 0}, "'d2'"),
    (ModelConfig, {"scale": 0.0}, "'scale'"),
    (ModelConfig, {"skew": -0.1}, "'skew'"),
    (TrainConfig, {"steps": -1}, "'steps'"),
    (TrainConfig, {"lr": 0.0}, "'lr'"),
    (TrainConfig, {"output_sample": 0}, "'output_sample'"),
    (TrainConfig, {"loss": "hinge"}, "'loss'"),
    # unknown keys
    (DataConfig, {"sparsty": "exact"}, "unknown key 'sparsty' for DataConfig; valid keys: .*sparsity"),
    (ModelConfig, {"width": 10}, "unknown key 'width' for ModelConfig"),
    (TrainConfig, {"stpes": 10}, "unknown key 'stpes' for TrainConfig"),
]


@pytest.mark.parametrize("cls, values, pattern", BAD)
def test_a_bad_value_is_one_config_error_line_naming_the_field(cls, values, pattern):
    for build in (lambda: cls(**values), lambda: cls.parse(values)):
        with pytest.raises(ConfigError, match=pattern) as info:
            build()
        assert "\n" not in str(info.value)


def test_good_values_keep_their_meaning():
    data = DataConfig(m=10, s=2, noise=0, op="XOR")
    assert data.noise == 0.0 and isinstance(data.noise, float) and data.op == "XOR"
    model = ModelConfig.parse({"d": 8, "d2": 4, "frozen": ["W", "W2"]})  # a list, as JSON gives it
    assert model.frozen == ("W", "W2")
    train = TrainConfig(lr=1, base_width=None)
    assert train.lr == 1.0 and train.base_width is None
    assert DataConfig(**data.to_dict()) == data and TrainConfig.parse(train.to_dict()) == train
