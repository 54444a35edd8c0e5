"""The agent's one way to run a program (it cannot use appliance.run: only the agent is on the node)."""

from __future__ import annotations

import subprocess

from appliance.agent.errors import AgentError, ErrorCode


def run_tool(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The program's stdout, or an agent error carrying the end of its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise AgentError(ErrorCode.TOOL_FAILED, f"{argv[0]} failed: {result.stderr.strip()[-500:]}")
    return result.stdout
