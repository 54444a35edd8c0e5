"""A real `appliance-agent serve` process for tests, spoken to over its pipes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class AgentProcess:
    def __init__(
        self,
        state_dir: Path,
        accel: str = "tcg",
        config: Path | None = None,
        wrapper: Sequence[str] = (),
        python: str = sys.executable,
        env: dict[str, str] | None = None,
    ) -> None:
        """`wrapper` runs the agent through another command (e.g. `ip netns exec NS setpriv ...`),
        `python` with another interpreter (the agent needs only the standard library)."""
        # Without --config the agent would read the node's /etc/appliance/agent.toml.
        config = config or state_dir.parent / "no-agent.toml"
        self.process = subprocess.Popen(
            [
                *wrapper,
                python,
                "-m",
                "appliance.agent",
                "--config",
                str(config),
                "--state-dir",
                str(state_dir),
                "serve",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **(env or {}), "APPLIANCE_ACCEL": accel},
        )

    def send_raw(self, line: bytes) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(line + b"\n")
        self.process.stdin.flush()
        reply: dict[str, Any] = json.loads(self.process.stdout.readline())
        return reply

    def send_with_data(self, method: str, params: dict[str, Any], data: bytes) -> dict[str, Any]:
        """A request whose line is followed by raw data (image.import)."""
        assert self.process.stdin and self.process.stdout
        line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
        self.process.stdin.write(line + b"\n" + data)
        self.process.stdin.flush()
        reply: dict[str, Any] = json.loads(self.process.stdout.readline())
        return reply

    def import_image(self, name: str, data: bytes) -> dict[str, Any]:
        params = {"name": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return self.send_with_data("image.import", params, data)

    def call(self, method: str, params: dict[str, Any] | None = None, request_id: int = 1) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        return self.send_raw(json.dumps(message).encode())

    def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        reply = self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def error_code(self, method: str, params: dict[str, Any] | None = None) -> str:
        reply = self.call(method, params)
        assert "error" in reply, reply
        code: str = reply["error"]["data"]["code"]
        return code

    def close(self) -> int:
        assert self.process.stdin
        self.process.stdin.close()
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def kill_running_guests(self) -> None:
        for guest in self.result("guest.list"):
            if guest["state"] != "stopped":
                self.call("guest.kill", {"name": guest["name"]})


# What the integration tests' start_agent fixture is: start_agent(policy=None) -> AgentProcess.
StartAgent = Callable[..., AgentProcess]
