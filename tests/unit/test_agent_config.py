"""The agent's [policy] table: read by the rules declared in appliance/agent/policy.py, as the spec's is."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.agent.config import ConfigError, load_config
from appliance.agent.policy import LIMITS, Policy
from appliance.build.render import BuildIdentity, render_image_files
from appliance.spec import SpecError, parse_spec

AGENT_TOML = "appliance-agent/static/etc/appliance/agent.toml"


def config_with_policy(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"[policy]\n{body}\n")
    return path


def test_the_policy_rendered_from_a_spec_reads_back_as_that_policy(tmp_path: Path) -> None:
    spec = parse_spec(
        "[policy]\nreserved_memory_mib = 2048\nmemory_overcommit = 2\ncpu_overcommit = 0.5\nmax_guests = 8", "t"
    )
    identity = BuildIdentity(build_id="b", created="c", spec_sha256="0" * 64, tool_version="0")
    render_image_files(spec, identity, tmp_path)
    config = load_config(tmp_path / AGENT_TOML)
    assert config.policy == spec.policy == Policy(2048, 2.0, 0.5, 8)
    # A real number written whole is still a real number, on both sides.
    assert isinstance(config.policy.memory_overcommit, float)


def test_missing_policy_keys_keep_their_defaults(tmp_path: Path) -> None:
    assert load_config(config_with_policy(tmp_path, "max_guests = 3")).policy == Policy(max_guests=3)
    assert Policy() == Policy(**{limit.key: limit.default for limit in LIMITS})


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("max_guests = 0", "max_guests = 0: a whole number from 1 to 4096"),
        ("max_guests = 2.0", "max_guests = 2.0: a whole number from 1 to 4096"),
        ("memory_overcommit = 11", "memory_overcommit = 11: a number from 0.1 to 10"),
        ('cpu_overcommit = "lots"', "cpu_overcommit = 'lots': a number from 0.1 to 64"),
        ("reserved_memory_mib = true", "reserved_memory_mib = True: a whole number from 0 to"),
        # Once cast with int(): a string of digits is refused now, as the spec refuses it.
        ('reserved_memory_mib = "1024"', "reserved_memory_mib = '1024': a whole number"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_key_value_and_what_is_allowed(
    tmp_path: Path, body: str, named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_with_policy(tmp_path, body))
    assert str(tmp_path / "agent.toml") in str(caught.value) and "[policy]" in str(caught.value)
    assert named in str(caught.value)


def test_the_agent_and_the_spec_refuse_a_value_in_the_same_words(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as spec_error:
        parse_spec("[policy]\ncpu_overcommit = 100", "t")
    (problem,) = spec_error.value.problems
    with pytest.raises(ConfigError) as config_error:
        load_config(config_with_policy(tmp_path, "cpu_overcommit = 100"))
    assert f"cpu_overcommit = 100: {problem.allowed}" in str(config_error.value)


def test_every_bad_value_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_with_policy(tmp_path, "max_guests = 0\ncpu_overcommit = 0"))
    assert "max_guests = 0" in str(caught.value) and "cpu_overcommit = 0" in str(caught.value)
