"""appliance.nodes.client against a real OpenSSH sshd on 127.0.0.1 with the agent forced."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from helpers.keys import make_key
from helpers.sshd import Sshd

from appliance.nodes.client import (
    AgentCallError,
    AuthenticationError,
    ConnectionLostError,
    HostKeyError,
    Node,
    NodeAddress,
    fingerprint,
    parse_address,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_key(tmp_path_factory.mktemp("client-keys"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[Sshd]:
    directory = tmp_path_factory.mktemp("sshd")
    server = Sshd(directory, keys.with_suffix(".pub").read_text().strip(), directory / "state")
    server.start()
    yield server
    server.stop()


def node_for(sshd: Sshd, key: Path, known_hosts: Path, strict: bool = False) -> Node:
    return Node(NodeAddress("127.0.0.1", sshd.port, "root"), key, known_hosts=known_hosts, strict=strict, timeout=30)


def test_many_requests_on_one_channel(sshd: Sshd, keys: Path, tmp_path: Path) -> None:
    with node_for(sshd, keys, tmp_path / "known_hosts") as node:
        assert node.call("agent.hello")["protocol"] == 1
        for _ in range(10):
            assert node.call("host.report", idempotent=True)["cpus"] >= 1
        with pytest.raises(AgentCallError) as caught:
            node.call("guest.info", {"name": "ghost"})
        assert caught.value.code == "guest_not_found"
        assert node.call("guest.list") == []
    assert "127.0.0.1" in (tmp_path / "known_hosts").read_text()


def test_a_wrong_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    stranger = make_key(tmp_path, "stranger")
    with pytest.raises(AuthenticationError):
        node_for(sshd, stranger, tmp_path / "known_hosts").connect()


def test_a_changed_host_key_is_refused_naming_both_fingerprints(sshd: Sshd, keys: Path, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    impostor = paramiko.PKey.from_path(make_key(tmp_path, "impostor"))
    recorded = paramiko.HostKeys()
    recorded.add(f"[127.0.0.1]:{sshd.port}", impostor.get_name(), impostor)
    recorded.save(str(known_hosts))
    real = paramiko.PKey.from_path(sshd.host_key)
    with pytest.raises(HostKeyError) as caught:
        node_for(sshd, keys, known_hosts).connect()
    assert fingerprint(impostor) in str(caught.value) and fingerprint(real) in str(caught.value)


def test_strict_mode_refuses_an_unknown_host(sshd: Sshd, keys: Path, tmp_path: Path) -> None:
    with pytest.raises(HostKeyError, match="strict"):
        node_for(sshd, keys, tmp_path / "known_hosts", strict=True).connect()
    assert not (tmp_path / "known_hosts").exists()


def raw_transport(sshd: Sshd, keys: Path) -> paramiko.Transport:
    transport = paramiko.Transport(("127.0.0.1", sshd.port))
    transport.connect(pkey=paramiko.PKey.from_path(keys), username="root")
    return transport


def test_the_agent_key_gets_no_shell_no_other_command_no_pty_no_forwarding(sshd: Sshd, keys: Path) -> None:
    transport = raw_transport(sshd, keys)
    try:
        # Another command: the forced agent runs instead, and sees no request.
        channel = transport.open_session()
        channel.exec_command("echo escaped; id")
        channel.shutdown_write()
        output = channel.makefile("rb").read()
        assert b"escaped" not in output and b"uid=" not in output
        # A pty is refused (restrict).
        channel = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            channel.get_pty()
        # A shell request also runs the agent, which answers requests, not shell commands.
        channel = transport.open_session()
        channel.invoke_shell()
        channel.sendall(b"echo escaped\n")
        reply = channel.makefile("rb").readline()
        assert b'"parse_error"' in reply and reply != b"escaped\n"
        # Port forwarding is refused.
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel("direct-tcpip", ("127.0.0.1", sshd.port), ("127.0.0.1", 0))
    finally:
        transport.close()


def test_addresses_parse_user_host_and_port(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host lab1\n  HostName 10.0.0.5\n  Port 2200\n  User ops\n")
    assert parse_address("ops@node7:2222", config) == NodeAddress("node7", 2222, "ops")
    assert parse_address("node7", config) == NodeAddress("node7", 22, "appliance")
    assert parse_address("lab1", config) == NodeAddress("10.0.0.5", 2200, "ops")
    assert parse_address("root@lab1:2300", config) == NodeAddress("10.0.0.5", 2300, "root")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False)


def test_cli_drives_guests_on_a_node(sshd: Sshd, keys: Path, tmp_path: Path) -> None:
    host = f"root@127.0.0.1:{sshd.port}"
    common = ["--key", str(keys), "--known-hosts", str(tmp_path / "known_hosts")]
    created = run_cli("guest", "create", host, "web", "--memory", "64", "--disk-size", "1", *common)
    assert created.returncode == 0, created.stderr
    listed = run_cli("guest", "list", host, *common)
    assert listed.returncode == 0 and "NAME" in listed.stdout and "web" in listed.stdout and "stopped" in listed.stdout
    as_json = run_cli("guest", "list", host, "--json", *common)
    assert json.loads(as_json.stdout)[0]["name"] == "web"
    report = run_cli("node", "report", host, *common)
    assert report.returncode == 0 and "memory_total_bytes" in report.stdout
    missing = run_cli("guest", "info", host, "ghost", *common)
    assert missing.returncode == 1 and "guest_not_found" in missing.stderr and "Traceback" not in missing.stderr
    deleted = run_cli("guest", "delete", host, "web", "--remove-disks", *common)
    assert deleted.returncode == 0


def test_cli_names_an_unreachable_node(keys: Path, tmp_path: Path) -> None:
    from helpers.sshd import free_port

    result = run_cli(
        "node", "report", f"127.0.0.1:{free_port()}", "--key", str(keys), "--known-hosts", str(tmp_path / "kh")
    )
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr


def test_image_push_streams_a_file_the_node_checks(sshd: Sshd, keys: Path, tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(bytes(range(256)) * 8192)
    host = f"root@127.0.0.1:{sshd.port}"
    common = ["--key", str(keys), "--known-hosts", str(tmp_path / "known_hosts")]
    pushed = run_cli("image", "push", host, str(image), "--json", *common)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert "base.img" in run_cli("image", "list", host, *common).stdout
    again = run_cli("image", "push", host, str(image), *common)
    assert again.returncode == 1 and "image_exists" in again.stderr
    assert run_cli("image", "delete", host, "base.img", *common).returncode == 0


def test_a_lost_connection_is_retried_once_for_reads_and_never_for_writes(
    sshd: Sshd, keys: Path, tmp_path: Path
) -> None:
    with node_for(sshd, keys, tmp_path / "known_hosts") as node:
        assert node._transport is not None
        node._transport.close()  # the connection drops under the client
        assert node.call("host.report", idempotent=True)["cpus"] >= 1
        assert node._transport is not None
        node._transport.close()
        with pytest.raises(ConnectionLostError):
            node.call("guest.create", {"name": "once", "memory_mib": 32})


def test_json_failures_are_one_json_object_with_the_agents_code_or_the_clients(
    sshd: Sshd, keys: Path, tmp_path: Path
) -> None:
    host = f"root@127.0.0.1:{sshd.port}"
    common = ["--key", str(keys), "--known-hosts", str(tmp_path / "known_hosts"), "--json"]
    missing = run_cli("guest", "info", host, "ghost", *common)
    assert missing.returncode == 1
    error = json.loads(missing.stdout)["error"]
    assert error["code"] == "guest_not_found" and "ghost" in error["message"]
    assert not error["message"].startswith("guest_not_found")
    invalid = run_cli("guest", "create", host, "no/slash", "--memory", "64", *common)
    assert invalid.returncode == 1
    assert json.loads(invalid.stdout)["error"]["details"] == {"field": "name"}
    stranger = make_key(tmp_path, "stranger")
    refused = run_cli("node", "report", host, *common[2:], "--key", str(stranger))
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"]["code"] == "auth_failed"
    strict = run_cli("guest", "list", host, "--key", str(keys), "--known-hosts", str(tmp_path / "kh2"),
                     "--strict", "--json")  # fmt: skip
    assert strict.returncode == 1 and json.loads(strict.stdout)["error"]["code"] == "host_key"
    usage = run_cli("guest", "info", host, "--json")
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["code"] == "usage"
    assert "the following arguments are required: name" in usage.stderr
    public = run_cli("image", "list", host, *common, "--key", str(keys) + ".pub")
    assert public.returncode == 2 and json.loads(public.stdout)["error"]["code"] == "key_file"
    for result in (missing, invalid, refused, strict, usage, public):
        assert len(result.stdout.splitlines()) == 1 and "Traceback" not in result.stderr


def test_image_push_checks_name_and_store_before_uploading(sshd: Sshd, keys: Path, tmp_path: Path) -> None:
    from helpers.sshd import free_port

    from appliance.nodes.client import ImageExistsError

    image = tmp_path / "disk.img"
    image.write_bytes(b"\1" * 3 * (1 << 20))
    host = f"root@127.0.0.1:{sshd.port}"
    common = ["--key", str(keys), "--known-hosts", str(tmp_path / "known_hosts")]
    assert run_cli("image", "push", host, str(image), *common).returncode == 0
    with node_for(sshd, keys, tmp_path / "known_hosts") as node:
        sent: list[int] = []
        with pytest.raises(ImageExistsError, match=r"already has an image named 'disk\.img'"):
            node.push_image(image, "disk.img", lambda done, size: sent.append(done))
        assert sent == []  # not a byte went out
    again = run_cli("image", "push", host, str(image), "--json", *common)
    assert again.returncode == 1 and json.loads(again.stdout)["error"]["code"] == "image_exists"
    assert "==> push" not in again.stderr  # the upload never started
    # Wrong names and directories are refused before any node is contacted (this one is not there).
    dead = f"127.0.0.1:{free_port()}"
    bad_name = run_cli("image", "push", dead, str(image), "--name", "../escape", *common)
    assert bad_name.returncode == 2 and "image name '../escape': name must be 1-63 characters" in bad_name.stderr
    directory = run_cli("image", "push", dead, str(tmp_path), *common)
    assert directory.returncode == 2 and f"{tmp_path} is a directory: give an image file" in directory.stderr
    assert "no such file" not in directory.stderr
    # The list shows when, as people read dates; --json keeps the number.
    listed = run_cli("image", "list", host, *common)
    assert listed.returncode == 0 and "CREATED" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith("disk.img"))
    created = json.loads(run_cli("image", "list", host, "--json", *common).stdout)[0]["created"]
    assert isinstance(created, int | float) and str(int(created)) not in row
    assert re.search(r"\b20\d\d-\d\d-\d\d \d\d:\d\d:\d\d\b", row)
    assert run_cli("image", "delete", host, "disk.img", *common).returncode == 0


def test_guest_help_says_what_each_verb_does() -> None:
    helped = run_cli("guest", "--help").stdout
    assert "show a guest's details" in helped and "show a guest's console" in helped
    assert "info a guest" not in helped and "console a guest" not in helped
