"""DecodeConfig is the one source of decode defaults: fluid.generate and the scripts compose it."""

import dataclasses

import pytest

from fluid.decoding import DecodeConfig
from fluid.utils.compose import compose


def test_generate_config_takes_its_decode_defaults_from_the_dataclass():
    cfg = compose("generate")
    assert dict(cfg.decode) == dataclasses.asdict(DecodeConfig())
    over = compose("generate", ["decode.k_max=8", "decode.token_budget=null", "decode.confidence=0.5"])
    d = DecodeConfig(**over.decode)
    assert (d.k_max, d.token_budget, d.fill_threshold) == (8, None, 0.5)


def test_a_wrongly_typed_decode_value_is_refused_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("generate", ["decode.k_max=abc"])
    with pytest.raises(ConfigCompositionException):
        compose("generate", ["decode.no_such_field=1"])


def test_caps_follow_the_token_budget():
    cfg = DecodeConfig(k_min=4, k_max=16, token_budget=320)
    assert cfg.caps(1) == (16, 15)        # one row: the budget allows k_max, a lane of k_max - 1
    assert cfg.caps(16) == (10, 9)        # 320 // (2 * 16)
    assert cfg.caps(64) == (4, 3)         # never below k_min
    assert DecodeConfig(token_budget=None, lane_len=3).caps(64) == (16, 3)
    assert DecodeConfig(share_verify_draft=False).caps(1) == (16, 0)
