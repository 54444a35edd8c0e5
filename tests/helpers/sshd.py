"""A real OpenSSH sshd on 127.0.0.1 for tests: throwaway config and host key, forced agent command."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

from appliance.build.layout import REPOSITORY as REPO
from helpers.keys import make_key
from helpers.waiting import wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Sshd:
    """sshd -D on a free port; operator keys forced to this repository's agent."""

    def __init__(
        self,
        directory: Path,
        operator_public_key: str,
        state_dir: Path,
        extra_config: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        """ENV: more environment for the agent (sshd gives it none of its own)."""
        directory.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.directory = directory
        self.port = free_port()
        self.host_key = make_key(directory, "host_key")
        variables = " ".join(shlex.quote(f"{name}={value}") for name, value in (env or {}).items())
        agent = (
            f"cd {shlex.quote(str(REPO))} && exec {'env ' + variables + ' ' if variables else ''}"
            f"{shlex.quote(sys.executable)} -m appliance.agent "
            f"--config /nonexistent --state-dir {shlex.quote(str(state_dir))} serve"
        )
        escaped = agent.replace("\\", "\\\\").replace('"', '\\"')
        self.key_options = f'restrict,command="{escaped}"'
        (directory / "authorized_keys").write_text("")
        self.authorize(operator_public_key)
        self.config = directory / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\nPidFile {directory / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPermitRootLogin forced-commands-only\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AllowTcpForwarding no\nX11Forwarding no\nPermitTunnel no\nAllowAgentForwarding no\n"
            + "MaxStartups 100:30:300\n"  # as the node's sshd: a fleet's burst of connections
            + extra_config  # after it: a test's own MaxStartups (sshd takes the last one) wins
        )
        self.process: subprocess.Popen[bytes] | None = None

    def authorize(self, public_key: str) -> None:
        """Another operator key, forced to the agent like the first."""
        with (self.directory / "authorized_keys").open("a") as keys:
            keys.write(f"{self.key_options} {public_key}\n")

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "sshd.log").open("wb"),
        )
        wait_until(self.accepts_connections, 30, "sshd to listen")

    def accepts_connections(self) -> bool:
        assert self.process is not None and self.process.poll() is None, (self.directory / "sshd.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
