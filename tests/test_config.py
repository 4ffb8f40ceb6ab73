import math

import pytest

from sere_dist.config import SereConfig, SereConfigError


@pytest.mark.parametrize("kwargs, field", [
    ({"select_top_k": 0}, "select_top_k"),
    ({"select_top_k": 2.5}, "select_top_k"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": 1.01}, "threshold"),
    ({"threshold": math.nan}, "threshold"),
    ({"metric": "euclid"}, "metric"),
    ({"phase": "prefill"}, "phase"),
    ({"mode": "fast"}, "mode"),
    ({"layers": {"x": {"threshold": 0.1}}}, "layers"),
    ({"layers": {3: {"threshold": 2.0}}}, "layers[3].threshold"),
    ({"layers": {3: {"rho": 0.2}}}, "layers[3]"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(SereConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        SereConfig(**kwargs)


def test_s_above_model_top_k_is_refused_with_both_numbers():
    cfg = SereConfig(select_top_k=5)
    with pytest.raises(SereConfigError, match=r"select_top_k=5 exceeds the model's top-k \(4\)"):
        cfg.check_top_k(4)
    SereConfig(select_top_k=4).check_top_k(4)


def test_override_for_a_layer_that_is_not_moe_is_refused():
    cfg = SereConfig(layers={7: {"select_top_k": 1}})
    with pytest.raises(SereConfigError, match="layer 7"):
        cfg.check_top_k(4, layers=[0, 1])


def test_per_layer_overrides_apply_only_to_their_layer():
    cfg = SereConfig(select_top_k=2, threshold=0.3, layers={"1": {"threshold": 0.8}})
    assert cfg.for_layer(0) == (2, 0.3)
    assert cfg.for_layer(1) == (2, 0.8)


def test_round_trip_through_a_plain_dict():
    cfg = SereConfig(select_top_k=1, threshold=0.5, mode="rank_aware", layers={2: {"select_top_k": 3}})
    assert SereConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_top_level_key_is_refused():
    with pytest.raises(SereConfigError, match="unknown field"):
        SereConfig.from_dict({"select_top_k": 1, "rh0": 0.2})
