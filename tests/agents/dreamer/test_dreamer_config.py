from __future__ import annotations

import pytest

from config import Config, UserError, build_config


def test_dreamer_defaults_validate_and_are_off() -> None:
    cfg = Config().validate()
    assert cfg.dreamer.enabled is False
    assert (cfg.dreamer.batch_size, cfg.dreamer.seq_len, cfg.dreamer.horizon) == (16, 64, 15)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dreamer.size=huge", "dreamer.size must be one of"),
        ("dreamer.seq_len=0", "dreamer.seq_len must be >= 1"),
        ("dreamer.train_ratio=0", "dreamer.train_ratio must be > 0"),
        ("dreamer.lam=1.5", "dreamer.lam must be in"),
        ("dreamer.unimix=1.0", "dreamer.unimix must be in"),
    ],
)
def test_bad_dreamer_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_config("debug", overrides=[override]).validate()
    assert "\n" not in str(err.value)


def test_a_disabled_dreamer_section_keeps_the_config_hash() -> None:
    """Checkpoints written before the Dreamer member existed keep verifying; enabling it changes the hash."""
    base = build_config("debug").hash()
    assert build_config("debug", overrides=["dreamer.size=small"]).hash() == base
    assert build_config("debug", overrides=["dreamer.enabled=true"]).hash() != base
