"""The agent's configuration file (/etc/appliance/agent.toml, rendered from the spec)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.agent.nics import NetworkConfig
from appliance.agent.policy import Policy, read_policy

DEFAULT_CONFIG_PATH = Path("/etc/appliance/agent.toml")
ACCEL_SETTINGS = ("auto", "kvm", "tcg")


class ConfigError(Exception):
    """The agent configuration file cannot be read or holds a value that is not allowed."""


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    build_info_path: Path
    ready_marker: str
    # "auto": KVM where a probe guest runs under it, else TCG; or "kvm"/"tcg".
    accel: str = "auto"
    policy: Policy = field(default_factory=Policy)
    network: NetworkConfig = field(default_factory=NetworkConfig)


def load_config(path: Path) -> AgentConfig:
    """Read the agent config; a missing file gives the built-in defaults."""
    data: dict[str, object] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from error
    agent = data.get("agent", {})
    if not isinstance(agent, dict):
        raise ConfigError(f"{path}: [agent] must be a table")
    accel = str(agent.get("accel", "auto"))
    if accel not in ACCEL_SETTINGS:
        raise ConfigError(f"{path}: [agent] accel is {accel!r}; allowed: {', '.join(ACCEL_SETTINGS)}")
    return AgentConfig(
        state_dir=Path(str(agent.get("state_dir", "/var/lib/appliance"))),
        build_info_path=Path(str(agent.get("build_info", "/etc/appliance/build.json"))),
        ready_marker=str(agent.get("ready_marker", "APPLIANCE-READY")),
        accel=accel,
        policy=policy_of(data.get("policy", {}), path),
        network=read_network(data.get("network", {}), path),
    )


def policy_of(table: object, path: Path) -> Policy:
    """The [policy] table, read by the same rules as the spec's; a value out of range is refused,
    not cast: the file is rendered from a checked spec, so a bad value means it was edited."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [policy] must be a table")
    policy, refusals = read_policy(table)
    if refusals:
        reasons = "; ".join(f"{refusal.key} = {refusal.value!r}: {refusal.allowed}" for refusal in refusals)
        raise ConfigError(f"{path}: [policy] {reasons}")
    return policy


def read_network(table: object, path: Path) -> NetworkConfig:
    """[network]: the bridges guest NICs may use (read by the agent and by the root tap helper)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [network] must be a table")
    defaults = NetworkConfig()
    bridges = table.get("allowed_bridges", list(defaults.allowed_bridges))
    if not isinstance(bridges, list) or not all(isinstance(bridge, str) for bridge in bridges):
        raise ConfigError(f"{path}: [network] allowed_bridges must be a list of bridge names")
    return NetworkConfig(
        allowed_bridges=tuple(bridges),
        tap_helper_socket=Path(str(table.get("tap_helper_socket", defaults.tap_helper_socket))),
    )
