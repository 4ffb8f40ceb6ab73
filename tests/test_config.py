import math

import pytest

from sere_dist.core.config import SereConfig, SereConfigError


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
    ({"mode": "error_aware", "gain_threshold": 1.5}, "gain_threshold"),
    ({"gain_threshold": math.inf}, "gain_threshold"),
    ({"unmatched": "discard"}, "unmatched"),
    ({"gain_weighting": "tokens"}, "gain_weighting"),
    # a setting the mode ignores is refused, not silently dropped
    ({"gain_threshold": 0.5}, r"sere.gain_threshold=0.5 applies to the error-aware modes only, but sere.mode is 'paper'"),
    ({"mode": "rank_aware", "unmatched": "drop"}, r"sere.unmatched='drop' applies to the error-aware modes only"),
    ({"gain_weighting": "count"}, "sere.gain_weighting"),
    ({"keep_sum": True}, r"sere.keep_sum=True applies to the error-aware modes only"),
    ({"mode": "error_aware", "keep_sum": "yes"}, "keep_sum"),
    ({"mode": "error_aware", "threshold": 0.5}, r"sere.threshold=0.5 .* unused in sere.mode='error_aware'; set "
                                                r"sere.gain_threshold"),
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


# --- typed configs: wrong types are refused, not coerced, in one line naming the field ---------------

@pytest.mark.parametrize("kwargs, message", [
    ({"enabled": "no"}, r"sere.enabled='no': .*use true or false"),
    ({"select_top_k": "2"}, r"sere.select_top_k='2': .*use an integer"),
    ({"threshold": "0.3"}, r"sere.threshold='0.3': .*use a number"),
    ({"layers": [1, 2]}, r"sere.layers=\[1, 2\]: is a list; use a mapping"),
    ({"layers": {"1": {"select_top_k": True}}}, r"sere.layers\[1\].select_top_k=True"),
    ({"artifact": 3}, r"sere.artifact=3: .*use a string"),
])
def test_wrong_types_are_refused_with_the_field_and_the_fix(kwargs, message):
    with pytest.raises(SereConfigError, match=message) as info:
        SereConfig.from_dict(kwargs)
    assert "\n" not in str(info.value)


def test_layer_keys_from_json_are_integers():
    assert SereConfig.from_dict({"layers": {"3": {"select_top_k": 1}}}).for_layer(3) == (1, 0.3)


def test_serving_arguments_refuse_wrong_types_and_unknown_keys():
    from sere_dist.serve.config import ServeArgs, ServingConfigError

    for args, message in [({"cpus_per_worker": -1}, r"cpus_per_worker must be > 0, got -1"),
                          ({"engine": ["max_model_len", 256]}, r"engine=.*is a list; use a mapping"),
                          ({"baseline": "yes"}, r"baseline='yes': .*use true or false"),
                          ({"accelerator": "tpu"}, r"accelerator='tpu': .*use one of cpu or gpu"),
                          ({"replicas": 2}, r"unknown serving argument\(s\) \['replicas'\]; allowed: accelerator")]:
        with pytest.raises(ServingConfigError, match=message):
            ServeArgs.from_dict(args)
    with pytest.raises(SereConfigError, match=r"sere.enabled='no'"):
        ServeArgs.from_dict({"sere": {"enabled": "no"}})
    assert ServeArgs.from_dict({"sere": None}).sere is None
    assert ServeArgs.from_dict({}).sere == SereConfig(artifact="default", select_top_k=2, threshold=0.3)


def test_calibration_job_names_the_command_line_option():
    from sere_dist.calibration.pipeline import CalibrationJob
    from sere_dist.core.config import ConfigError

    for kwargs, message in [({"num_samples": 0}, r"--num-samples must be >= 1, got 0"),
                            ({"cpus_per_worker": -1}, r"--cpus-per-worker must be > 0, got -1"),
                            ({"num_workers": "2"}, r"--num-workers='2': .*use an integer"),
                            ({"dtype": "int8"}, r"--dtype='int8': .*use one of float32, bfloat16 or float16")]:
        with pytest.raises(ConfigError, match=message):
            CalibrationJob(model="m", out="o", **kwargs)


def test_error_aware_modes_use_the_gain_threshold_and_map_to_the_ops_rule():
    cfg = SereConfig(mode="error_aware", threshold=0.3, gain_threshold=0.25, layers={1: {"threshold": 0.75}})
    assert cfg.error_aware and cfg.rule == "paper"
    assert cfg.for_layer(0) == (2, 0.25) and cfg.for_layer(1) == (2, 0.75)   # a layer override is its gain threshold
    assert SereConfig(mode="error_aware_rank_aware").rule == "rank_aware"
    assert SereConfig(mode="paper", threshold=0.4).for_layer(0) == (2, 0.4)
    assert not SereConfig(mode="top_s").error_aware
    back = SereConfig.from_dict(cfg.to_dict())
    assert back == cfg


def test_a_serve_config_with_a_setting_its_mode_ignores_is_refused_in_one_line():
    from sere_dist.serve.config import ServeArgs

    with pytest.raises(SereConfigError, match=r"^sere.unmatched='drop' applies to the error-aware modes only") as e:
        ServeArgs.from_dict({"sere": {"mode": "paper", "unmatched": "drop"}})
    assert "\n" not in str(e.value)
