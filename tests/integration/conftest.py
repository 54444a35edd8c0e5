"""The one way integration tests start the agent: `start_agent`, and `agent` for the common case.

Every agent a test starts is ended after it, and the guests it left running
are killed, so a failed assertion never leaves QEMU behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess, StartAgent


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def start_agent(state_dir: Path, tmp_path: Path) -> Iterator[StartAgent]:
    """start_agent(policy=None, env=None): a new `appliance-agent serve` on the test's state directory;
    `policy` is the body of an agent.toml [policy] table, `env` more environment for it."""
    started: list[AgentProcess] = []

    def start(policy: str | None = None, env: dict[str, str] | None = None) -> AgentProcess:
        config = None
        if policy is not None:
            config = tmp_path / "agent.toml"
            config.write_text(f"[policy]\n{policy}\n")
        agent = AgentProcess(state_dir, config=config, env=env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()
    if (state_dir / "guests").is_dir():
        sweeper = AgentProcess(state_dir)
        sweeper.kill_running_guests()
        sweeper.kill()


@pytest.fixture
def agent(start_agent: StartAgent) -> AgentProcess:
    return start_agent()
