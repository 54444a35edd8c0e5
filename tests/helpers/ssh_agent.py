"""A real ssh-agent for a test: `ssh-agent -D -a SOCK`, keys added with the real ssh-add."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers.waiting import wait_until


class SshAgent:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "agent.sock"
        self.process = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(self.socket)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self.socket.exists, 10, "ssh-agent's socket")

    def add(self, key: Path, passphrase: str = "") -> None:
        """ssh-add KEY; a passphrase is given the way ssh-add takes one without a terminal (SSH_ASKPASS)."""
        askpass = key.parent / f"{key.name}.askpass"
        askpass.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_AUTH_SOCK": str(self.socket), "SSH_ASKPASS": str(askpass),
               "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}  # fmt: skip
        subprocess.run(["ssh-add", str(key)], env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
