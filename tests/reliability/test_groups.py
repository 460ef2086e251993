"""Fallback groups in config: resolution order, de-duplication, skipped members, loops, validation."""

from __future__ import annotations

import pytest

from broker import errors
from broker.config import ConfigError, settings_from_dict
from broker.registry import Registry


def registry(aliases: dict[str, object]) -> Registry:
    settings = settings_from_dict(
        {
            "providers": [
                {"name": "a", "type": "openai", "base_url": "http://127.0.0.1:1/v1", "models": ["m1", "m2"]},
                {"name": "b", "type": "openai", "base_url": "http://127.0.0.1:2/v1", "models": ["m1"]},
                {"name": "off", "type": "openai", "base_url": "http://127.0.0.1:3/v1", "enabled": False},
            ],
            "aliases": aliases,
        },
        env={},
    )
    return Registry(settings)


def resolved(reg: Registry, ref: str) -> list[str]:
    return [f"{t.state.name}/{t.model}" for t in reg.resolve(ref)]


def test_members_in_order_each_target_once() -> None:
    reg = registry({"best": "a/m2", "group": ["best", "m1", "b/m1", "a/m2"]})
    # "m1" is listed by a and b (priority order); the repeats add nothing.
    assert resolved(reg, "group") == ["a/m2", "a/m1", "b/m1"]


def test_a_member_that_resolves_to_nothing_is_skipped() -> None:
    reg = registry({"group": ["off/m1", "nowhere-model", "b/m1"]})
    assert resolved(reg, "group") == ["b/m1"]


def test_a_group_with_no_usable_member_is_not_found() -> None:
    reg = registry({"group": ["off/m1", "nowhere-model"]})
    with pytest.raises(errors.ModelNotFound) as e:
        reg.resolve("group")
    assert "group 'group'" in e.value.message and "off/m1" in e.value.message


def test_groups_may_nest_but_a_loop_ends_in_not_found() -> None:
    reg = registry({"inner": ["b/m1"], "outer": ["a/m2", "inner"], "loop": ["loop"]})
    assert resolved(reg, "outer") == ["a/m2", "b/m1"]
    with pytest.raises(errors.ModelNotFound):
        reg.resolve("loop")


def test_an_empty_member_is_a_config_error_with_its_path() -> None:
    with pytest.raises(ConfigError) as e:
        registry({"group": ["a/m1", " "]})
    assert "aliases.group[1]: group member must not be empty" in e.value.problems
