"""The agent's configuration file (/etc/appliance/agent.toml, rendered from the spec)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/appliance/agent.toml")


class ConfigError(Exception):
    """The agent configuration file is missing a value or cannot be read."""


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    build_info_path: Path
    ready_marker: str
    # QEMU's -machine accel= for guests: "kvm:tcg" uses KVM where it works.
    accel: str = "kvm:tcg"


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
    return AgentConfig(
        state_dir=Path(str(agent.get("state_dir", "/var/lib/appliance"))),
        build_info_path=Path(str(agent.get("build_info", "/etc/appliance/build.json"))),
        ready_marker=str(agent.get("ready_marker", "APPLIANCE-READY")),
        accel=str(agent.get("accel", "kvm:tcg")),
    )
