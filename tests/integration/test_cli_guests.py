"""A guest's whole life from the command line, as the README shows it, against a real agent behind sshd."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.keys import make_key
from helpers.sshd import Sshd
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, list[str]]]:
    directory = tmp_path_factory.mktemp("cli-node")
    key = make_key(directory)
    server = Sshd(directory / "sshd", key.with_suffix(".pub").read_text().strip(), directory / "state")
    server.start()
    yield server, ["--key", str(key), "--known-hosts", str(directory / "known_hosts")]
    server.stop()


def cli(node: tuple[Sshd, list[str]], *args: str) -> subprocess.CompletedProcess[str]:
    server, common = node
    noun, verb, *rest = args
    command = [sys.executable, "-m", "appliance.cli", noun, verb, f"root@127.0.0.1:{server.port}", *rest, *common]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def ok(node: tuple[Sshd, list[str]], *args: str) -> str:
    result = cli(node, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def test_a_guest_that_boots_from_create_to_kept_disks(node: tuple[Sshd, list[str]], tmp_path: Path) -> None:
    image = tmp_path / "marker.img"
    image.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    ok(node, "image", "push", str(image))
    nothing = cli(node, "guest", "create", "empty", "--memory", "64", "--json")
    assert nothing.returncode == 1 and json.loads(nothing.stdout)["error"]["code"] == "invalid_params"
    assert "nothing to boot" in nothing.stderr
    created = ok(node, "guest", "create", "web", "--memory", "64", "--disk", "image=marker.img", "--autostart")
    assert "memory_mib" in created and "marker.img" in created
    ok(node, "guest", "start", "web")
    wait_until(lambda: PROBE_MARKER.decode() in ok(node, "guest", "console", "web"), 60, "the guest's marker")
    info = json.loads(ok(node, "guest", "info", "web", "--json"))
    assert info["state"] == "running" and info["definition"]["autostart"] is True
    edited = json.loads(ok(node, "guest", "edit", "web", "--memory", "96", "--no-autostart", "--json"))
    assert edited["changed"] == ["autostart", "memory_mib"] and edited["restart_needed"] is True
    assert json.loads(ok(node, "guest", "set-memory", "web", "48", "--json"))["target_mib"] == 48
    live_cpu = cli(node, "guest", "set-cpu", "web", "--weight", "200", "--json")
    assert live_cpu.returncode == 1 and json.loads(live_cpu.stdout)["error"]["code"] == "unsupported"
    rebooted = json.loads(ok(node, "guest", "reboot", "web", "--timeout-stop", "1", "--json"))
    assert rebooted["mode"] == "acpi" and rebooted["forced"] is True  # the boot sector ignores ACPI
    assert json.loads(ok(node, "guest", "reboot", "web", "--hard", "--json"))["mode"] == "reset"
    assert json.loads(ok(node, "guest", "stop", "web", "--timeout-stop", "1", "--json"))["forced"] is True
    assert "web" in ok(node, "guest", "delete", "web")
    kept = json.loads(ok(node, "kept", "list", "--json"))
    assert [entry["guest"] for entry in kept] == ["web"]
    assert "KEPT" in ok(node, "kept", "list")
    ok(node, "kept", "restore", kept[0]["kept"], "--as", "web2")
    assert json.loads(ok(node, "guest", "info", "web2", "--json"))["definition"]["memory_mib"] == 96
    ok(node, "guest", "delete", "web2")
    (again,) = json.loads(ok(node, "kept", "list", "--json"))
    ok(node, "kept", "purge", again["kept"])
    assert json.loads(ok(node, "kept", "list", "--json")) == []
    logs = cli(node, "node", "logs", "--json")
    assert logs.returncode == 1 and json.loads(logs.stdout)["error"]["code"] == "unsupported"  # no systemd here


def test_a_guest_from_a_definition_file_with_options_on_top(node: tuple[Sshd, list[str]], tmp_path: Path) -> None:
    definition = tmp_path / "db.yaml"
    definition.write_text("memory_mib: 64\nvcpus: 2\ndisks:\n  - size_gib: 1\nrestart: on-failure\n")
    made = json.loads(ok(node, "guest", "create", "db", "--from", str(definition), "--vcpus", "1", "--json"))
    assert (made["vcpus"], made["memory_mib"], made["restart"]) == (1, 64, "on-failure")
    bad = cli(node, "guest", "create", "db2", "--from", str(definition), "--nic", "bridge", "--json")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "definition"
    ok(node, "guest", "delete", "db", "--remove-disks")
