"""The agent's one way to run a program (it cannot use appliance.run: only the agent is on the node)."""

from __future__ import annotations

import os
import shutil
import subprocess

from appliance.agent.errors import AgentError, ErrorCode


def run_tool(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The program's stdout, or an agent error carrying the end of its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise AgentError(ErrorCode.TOOL_FAILED, f"{argv[0]} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def find_program(name: str, package: str) -> str:
    """A program's path, looked for in the sbin directories too: the agent's PATH (a plain
    user's, under SSH) may lack them."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise AgentError(ErrorCode.TOOL_FAILED, f"{name} is not installed on this node (package {package})")
    return path
