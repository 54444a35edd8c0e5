"""Operator keys found as ssh finds them, through the CLI against a real sshd (agent forced).

Every run has a HOME of its own: the engineer's ~/.ssh and ssh-agent are never read.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import cli_environment, run_cli
from helpers.keys import make_key
from helpers.ssh_agent import SshAgent
from helpers.sshd import Sshd
from helpers.waiting import wait_until

PASSPHRASE = "correct horse"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("operator-keys")
    return {
        "plain": make_key(directory, "plain"),
        "locked": make_key(directory, "locked", passphrase=PASSPHRASE),
        "stranger": make_key(directory, "stranger"),
    }


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Iterator[Sshd]:
    directory = tmp_path_factory.mktemp("sshd")
    server = Sshd(directory, public(keys["plain"]), directory / "state")
    server.authorize(public(keys["locked"]))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    return tmp_path / "home"


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[SshAgent]:
    agent = SshAgent(tmp_path / "agent")
    yield agent
    agent.stop()


def public(key: Path) -> str:
    return key.with_name(key.name + ".pub").read_text().strip()


def report(
    sshd: Sshd, home: Path, *extra: str, host: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    target = host or f"root@127.0.0.1:{sshd.port}"
    return run_cli("node", "report", target, "--known-hosts", str(home / "known_hosts"), *extra, home=home, env=env)


def answered(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "memory_total_bytes" in result.stdout


def test_with_no_key_anywhere_the_command_says_every_way_to_give_one(sshd: Sshd, home: Path) -> None:
    result = report(sshd, home)
    assert result.returncode == 2, result.stderr
    for way in ("--key", "APPLIANCE_SSH_KEY", "IdentityFile", "ssh-agent", ".ssh/id_ed25519"):
        assert way in result.stderr
    assert "Traceback" not in result.stderr


def test_a_default_key_in_home_ssh_is_used_without_key(sshd: Sshd, keys: dict[str, Path], home: Path) -> None:
    shutil.copy(keys["plain"], home / ".ssh" / "id_ed25519")
    assert answered(report(sshd, home))


def test_an_ssh_config_alias_gives_hostname_port_user_and_identity_file(
    sshd: Sshd, keys: dict[str, Path], home: Path
) -> None:
    (home / "keys").mkdir()
    shutil.copy(keys["plain"], home / "keys" / "op")
    (home / ".ssh" / "config").write_text(
        f"Host lab\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n  IdentityFile ~/keys/op\n"
    )
    assert answered(report(sshd, home, host="lab"))
    # The IdentityFile is what was offered: another one in its place is refused, naming it.
    shutil.copy(keys["stranger"], home / "keys" / "op")
    refused = report(sshd, home, host="lab")
    assert refused.returncode == 1 and f"root@127.0.0.1 refused key {home / 'keys' / 'op'}" in refused.stderr
    # --key wins over the config's IdentityFile.
    assert answered(report(sshd, home, "--key", str(keys["plain"]), host="lab"))


def test_keys_of_a_running_ssh_agent_are_used(
    sshd: Sshd, keys: dict[str, Path], home: Path, ssh_agent: SshAgent
) -> None:
    agent_env = {"SSH_AUTH_SOCK": str(ssh_agent.socket)}
    assert report(sshd, home, env=agent_env).returncode == 2  # an empty agent: no key yet
    ssh_agent.add(keys["plain"])
    assert answered(report(sshd, home, env=agent_env))
    # A config alias with a refused IdentityFile still gets the agent's keys after it (unless IdentitiesOnly).
    shutil.copy(keys["stranger"], home / "stranger")
    config = f"Host lab\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n  IdentityFile ~/stranger\n"
    (home / ".ssh" / "config").write_text(config)
    assert answered(report(sshd, home, host="lab", env=agent_env))
    (home / ".ssh" / "config").write_text(config + "  IdentitiesOnly yes\n")
    assert report(sshd, home, host="lab", env=agent_env).returncode == 1


def test_a_passphrase_key_the_agent_holds_needs_no_passphrase(
    sshd: Sshd, keys: dict[str, Path], home: Path, ssh_agent: SshAgent
) -> None:
    ssh_agent.add(keys["locked"], PASSPHRASE)
    assert answered(report(sshd, home, "--key", str(keys["locked"]), env={"SSH_AUTH_SOCK": str(ssh_agent.socket)}))


def test_a_passphrase_key_takes_its_passphrase_from_the_environment(
    sshd: Sshd, keys: dict[str, Path], home: Path
) -> None:
    locked = str(keys["locked"])
    assert answered(report(sshd, home, "--key", locked, env={"APPLIANCE_SSH_PASSPHRASE": PASSPHRASE}))
    assert answered(report(sshd, home, env={"APPLIANCE_SSH_KEY": locked, "APPLIANCE_SSH_PASSPHRASE": PASSPHRASE}))
    wrong = report(sshd, home, "--key", locked, env={"APPLIANCE_SSH_PASSPHRASE": "nope"})
    assert wrong.returncode == 2 and f"wrong passphrase for key {locked}" in wrong.stderr
    # No terminal, no variable: it says how to give the passphrase, and contacts no node.
    untold = report(sshd, home, "--key", locked)
    assert untold.returncode == 2
    assert f"key {locked} is protected by a passphrase and there is no terminal to ask on" in untold.stderr
    assert "APPLIANCE_SSH_PASSPHRASE" in untold.stderr and f"ssh-add {locked}" in untold.stderr
    assert "Traceback" not in untold.stderr + wrong.stderr


def test_a_passphrase_is_asked_on_a_terminal(sshd: Sshd, keys: dict[str, Path], home: Path) -> None:
    leader, follower = os.openpty()
    command = [sys.executable, "-m", "appliance.cli", "node", "report", f"root@127.0.0.1:{sshd.port}",
               "--key", str(keys["locked"]), "--known-hosts", str(home / "known_hosts")]  # fmt: skip
    process = subprocess.Popen(command, stdin=follower, stdout=subprocess.PIPE, stderr=follower,
                               env=cli_environment(home), preexec_fn=take_terminal)  # fmt: skip
    os.close(follower)
    seen = b""

    def prompt_shown() -> bool:
        nonlocal seen
        if select.select([leader], [], [], 0.1)[0]:
            seen += os.read(leader, 1024)
        return b"Enter passphrase for key" in seen

    try:
        wait_until(prompt_shown, 60, "the passphrase prompt")
        assert str(keys["locked"]).encode() in seen
        os.write(leader, PASSPHRASE.encode() + b"\n")
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        os.close(leader)
    assert process.returncode == 0 and b"memory_total_bytes" in stdout


def take_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is its stdin, where getpass asks."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_a_public_key_given_as_key_is_refused_naming_the_private_one(
    sshd: Sshd, keys: dict[str, Path], home: Path
) -> None:
    given = keys["plain"].with_name("plain.pub")
    started = time.monotonic()
    result = report(sshd, home, "--key", str(given))
    assert result.returncode == 2
    assert f"{given} is a public key: give the private key (--key {keys['plain']})" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 30
    missing = report(sshd, home, "--key", str(home / "nope"))
    assert missing.returncode == 2 and f"no such key file: {home / 'nope'}" in missing.stderr
