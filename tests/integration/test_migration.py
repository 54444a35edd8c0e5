"""Guests moved between two nodes from the command line: two agents behind two OpenSSH sshds on 127.0.0.1,
real QEMU under TCG, the tiny guest counting on its console.

A running guest counts on at the destination without starting over, with its definition and the bytes of
its disk; a stopped one moves as files; a refusal moves nothing; and a destination whose agent is killed,
or whose connection is cut, mid-migration leaves the guest running on the source and nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.keys import make_key
from helpers.listeners import Listener
from helpers.sshd import Sshd
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest, tiny_counts
from helpers.waiting import wait_until

from appliance.agent.qemu import qmp_session
from appliance.agent.qmp import QMPError
from appliance.agent.supervisors import GuestFiles

pytestmark = pytest.mark.slow

DEADLINE = 180.0
MIB = 1 << 20
GIB = 1 << 30


@dataclass
class Nodes:
    """Node A and node B (each an sshd forcing its own agent, with its own state), and the CLI for both:
    "A" and "B" in a command stand for their addresses."""

    a: Sshd
    b: Sshd
    key: Path
    directory: Path
    # Nodes a test started besides A and B (stopped with them).
    extra: list[Sshd] = field(default_factory=list)

    def address(self, node: str) -> str:
        return f"root@127.0.0.1:{(self.a if node == 'A' else self.b).port}"

    def state(self, node: str) -> Path:
        return self.directory / node.lower() / "state"

    def command(self, *args: str) -> list[str]:
        words = [self.address(word) if word in ("A", "B") else word for word in args]
        common = ["--key", str(self.key), "--known-hosts", str(self.directory / "known_hosts")]
        return [sys.executable, "-m", "appliance.cli", *words, *common]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), capture_output=True, text=True, check=False, timeout=600,
                              stdin=subprocess.DEVNULL)  # fmt: skip

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def guests(self, node: str) -> list[str]:
        return [guest["name"] for guest in self.json("guest", "list", node)]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    directory = tmp_path_factory.mktemp("mig")
    key = make_key(directory)
    public = key.with_suffix(".pub").read_text().strip()
    a, b = (Sshd(directory / name / "sshd", public, directory / name / "state") for name in ("a", "b"))
    a.start()
    b.start()
    both = Nodes(a, b, key, directory)
    yield both
    for node in ("A", "B"):
        for guest in json.loads(both.cli("guest", "list", node, "--json").stdout or "[]"):
            if guest["state"] != "stopped":
                both.cli("guest", "kill", node, guest["name"])
    for node in (a, b, *both.extra):
        node.stop()


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


def counting_guest(nodes: Nodes, tiny: TinyGuest, name: str, *options: str, counter: str = "tiny.counter") -> Path:
    """A tiny guest counting on A (its kernel and initrd pushed to A alone, under names of its own), started;
    its console log once it has counted to 3."""
    for path, image in ((tiny.kernel, f"{name}-vmlinuz"), (tiny.initrd, f"{name}-initrd")):
        nodes.ok("image", "push", "A", str(path), "--name", image)
    nodes.ok("guest", "create", "A", name, "--memory", "128", "--kernel", f"{name}-vmlinuz", "--initrd",
             f"{name}-initrd", "--cmdline", f"{tiny.cmdline} {counter}", *options)  # fmt: skip
    return nodes.state("A") / "guests" / name / "console.log"


def start_counting(nodes: Nodes, name: str, console: Path) -> None:
    nodes.ok("guest", "start", "A", name)
    wait_until(lambda: len(counts(console)) >= 3, DEADLINE, f"{name} to count to 3")


def counts(console: Path) -> list[int]:
    try:
        return tiny_counts(console.read_text(errors="replace"))
    except FileNotFoundError:
        return []


def qemu_of(state: Path) -> list[int]:
    """QEMUs running with files in this node's state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if words[0].endswith(b"qemu-system-x86_64") and any(str(state).encode() in word for word in words):
            found.append(int(entry.name))
    return found


def agents_of(state: Path) -> list[int]:
    """The agent processes serving this node's connections."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"appliance.agent" in command_line and str(state).encode() in command_line and b"serve" in command_line:
            found.append(int(entry.name))
    return found


def migration_status(state: Path, name: str) -> dict[str, Any]:
    """What the source's QEMU says of its migration and its mirrors (asked as the agent asks: its turn on
    the monitor)."""
    try:
        with qmp_session(GuestFiles(state / "guests" / name)) as client:
            return {"migrate": client.execute("query-migrate"), "jobs": client.execute("query-block-jobs")}
    except QMPError:
        return {"migrate": {}, "jobs": []}


def raw_bytes(disk: Path, directory: Path) -> bytes:
    raw = directory / f"{disk.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(raw)], check=True)
    return raw.read_bytes()


def write_pattern(disk: Path) -> None:
    """The disk written at both ends: 4 MiB of 0x5a from 4 MiB, 4 MiB of 0xa5 at its last 4 MiB."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4M 4M", "-c", "write -P 0xa5 1020M 4M",
                    str(disk)], check=True, capture_output=True)  # fmt: skip


def assert_pattern(data: bytes) -> None:
    assert len(data) == GIB
    assert data[4 * MIB : 8 * MIB] == b"\x5a" * (4 * MIB)
    assert data[1020 * MIB :] == b"\xa5" * (4 * MIB)
    assert data[8 * MIB : 16 * MIB] == bytes(8 * MIB)


def test_a_running_guest_moves_counting_on_with_its_disk_and_definition(
    nodes: Nodes, tiny_guest: TinyGuest, tmp_path: Path
) -> None:
    console = counting_guest(nodes, tiny_guest, "mover", "--disk", "size=1G", "--nic", "user", "--hostname", "mover",
                             "--autostart", "--restart", "on-failure", "--cpu-weight", "300",
                             counter="tiny.counter=vda")  # fmt: skip
    write_pattern(nodes.state("A") / "guests" / "mover" / "disk0.qcow2")
    start_counting(nodes, "mover", console)
    definition = nodes.json("guest", "info", "A", "mover")["definition"]
    images_a = {image["name"]: image["sha256"] for image in nodes.json("image", "list", "A")}
    before = counts(console)[-1]

    result = nodes.json("guest", "migrate", "A", "mover", "B")

    assert (result["live"], result["state"]) == (True, "running")
    assert sorted(result["images_copied"]) == ["mover-initrd", "mover-vmlinuz"]  # B had neither
    (seed,) = (nodes.state("B") / "guests" / "mover").glob("seed-*.vfat")
    assert result["files_copied"] == [seed.name]  # byte for byte the volume the guest has attached
    assert result["downtime_ms"] is not None and result["disk_bytes"] >= GIB  # QEMU counts what it copied again too
    # The source: no QEMU, no definition, no files.
    assert "mover" not in nodes.guests("A")
    assert not (nodes.state("A") / "guests" / "mover").exists()
    assert not qemu_of(nodes.state("A"))
    # The destination: the same definition, the same images, running and counting on from where it was.
    info = nodes.json("guest", "info", "B", "mover")
    assert info["state"] == "running" and info["definition"] == definition
    images_b = {image["name"]: image["sha256"] for image in nodes.json("image", "list", "B")}
    assert {name: images_b[name] for name in ("mover-initrd", "mover-vmlinuz")} == {
        name: images_a[name] for name in ("mover-initrd", "mover-vmlinuz")
    }
    arrived = nodes.state("B") / "guests" / "mover" / "console.log"
    wait_until(lambda: len(counts(arrived)) >= 3, DEADLINE, "the guest to count on at B")
    seen = counts(arrived)
    assert seen[0] > before, (before, seen)  # it went on counting at A during the move, and on from there
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen  # no gap, no start over
    assert TINY_GUEST_MARKER not in arrived.read_text(errors="replace")  # no boot at B
    # Nothing of the move left in its directory.
    assert sorted(path.name for path in arrived.parent.glob("*.sock")) == ["qmp.sock", "serial.sock"]
    assert not list(arrived.parent.glob(".*"))

    # The disk: the bytes written before, and what the guest wrote as it moved (the count reached at B).
    last = counts(arrived)[-1]
    assert nodes.json("guest", "stop", "B", "mover")["forced"] is False
    data = raw_bytes(nodes.state("B") / "guests" / "mover" / "disk0.qcow2", tmp_path)
    assert_pattern(data)
    written = re.match(rb"tiny-count (\d+)\n", data[MIB : MIB + 512])
    assert written is not None and int(written.group(1)) >= last, data[MIB : MIB + 32]
    nodes.ok("guest", "delete", "B", "mover", "--remove-disks")


def test_a_stopped_guest_moves_its_disks_and_definition(nodes: Nodes, tmp_path: Path) -> None:
    base = tmp_path / "sleeper-base.img"
    base.write_bytes(bytes(range(256)) * 4096)  # 1 MiB the guest's first disk is over
    nodes.ok("image", "push", "A", str(base))
    nodes.ok("guest", "create", "A", "sleeper", "--memory", "64", "--disk", "image=sleeper-base.img",
             "--disk", "size=1G", "--nic", "user", "--hostname", "sleeper", "--autostart")  # fmt: skip
    directory = nodes.state("A") / "guests" / "sleeper"
    write_pattern(directory / "disk1.qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 512k 64k", str(directory / "disk0.qcow2")],
                   check=True, capture_output=True)  # fmt: skip
    (tmp_path / "a").mkdir()
    before = {disk: raw_bytes(directory / disk, tmp_path / "a") for disk in ("disk0.qcow2", "disk1.qcow2")}
    definition = nodes.json("guest", "info", "A", "sleeper")["definition"]

    result = nodes.json("guest", "migrate", "A", "sleeper", "B")

    assert (result["live"], result["state"]) == (False, "stopped")
    assert result["images_copied"] == ["sleeper-base.img"]
    assert result["files_copied"] == ["disk0.qcow2", "disk1.qcow2"]
    assert "sleeper" not in nodes.guests("A") and not directory.exists()
    info = nodes.json("guest", "info", "B", "sleeper")
    assert info["state"] == "stopped" and info["definition"] == definition
    arrived = nodes.state("B") / "guests" / "sleeper"
    (tmp_path / "b").mkdir()
    for disk, data in before.items():
        assert raw_bytes(arrived / disk, tmp_path / "b") == data, disk
    info = subprocess.run(["qemu-img", "info", "--output=json", str(arrived / "disk0.qcow2")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(info.stdout)["backing-filename"] == str(nodes.state("B") / "images" / "sleeper-base.img")
    nodes.ok("guest", "delete", "B", "sleeper", "--remove-disks")


def test_a_refused_migration_moves_nothing(nodes: Nodes, tmp_path: Path) -> None:
    """B has an image of the name the guest's disk is over, with other bytes: it refuses before a byte moves."""
    ours, theirs = tmp_path / "a" / "keeper-base.img", tmp_path / "b" / "keeper-base.img"
    for path, fill in ((ours, b"\x01"), (theirs, b"\x02")):
        path.parent.mkdir()
        path.write_bytes(fill * MIB)
    nodes.ok("image", "push", "A", str(ours))
    nodes.ok("image", "push", "B", str(theirs))
    nodes.ok("guest", "create", "A", "keeper", "--memory", "64", "--disk", "image=keeper-base.img")
    images_b = nodes.json("image", "list", "B")

    refused = nodes.cli("guest", "migrate", "A", "keeper", "B", "--json")

    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "migration_refused" and "keeper-base.img" in error["message"], error
    assert error["message"].endswith(f"nothing moved: it stays on {nodes.address('A')}"), error
    assert nodes.json("guest", "info", "A", "keeper")["state"] == "stopped"
    assert (nodes.state("A") / "guests" / "keeper" / "disk0.qcow2").exists()
    assert "keeper" not in nodes.guests("B") and not (nodes.state("B") / "guests" / "keeper").exists()
    assert nodes.json("image", "list", "B") == images_b
    # And the lock the refused migration took on the guest is free again.
    nodes.ok("guest", "delete", "A", "keeper", "--remove-disks")


def assert_left_on_the_source(nodes: Nodes, name: str, console: Path) -> None:
    """The guest runs on at A (counting on), and B holds nothing of it: no guest, directory or QEMU."""
    assert nodes.json("guest", "info", "A", name)["state"] == "running"
    counted = counts(console)[-1]
    wait_until(lambda: counts(console)[-1] >= counted + 2, DEADLINE, f"{name} to count on at A")
    assert name not in nodes.guests("B")  # a new agent at B: whatever was left is repaired by now
    assert not (nodes.state("B") / "guests" / name).exists()
    assert not qemu_of(nodes.state("B") / "guests" / name)
    assert not list((nodes.state("B") / "guests").glob(".*"))


def test_the_destinations_agent_killed_mid_migration_leaves_the_guest_on_the_source(
    nodes: Nodes, tiny_guest: TinyGuest
) -> None:
    console = counting_guest(nodes, tiny_guest, "survivor")
    start_counting(nodes, "survivor", console)
    # 1 MiB/s: the memory takes long enough to kill the destination in the middle of it.
    migrating = subprocess.Popen(nodes.command("guest", "migrate", "A", "survivor", "B", "--bandwidth", "1", "--json"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(
            lambda: (
                migration_status(nodes.state("A"), "survivor")["migrate"].get("ram", {}).get("transferred", 0) > 2 * MIB
            ),
            DEADLINE,
            "the memory to be on its way",
        )
        assert (nodes.state("B") / "guests" / "survivor").is_dir()
        for pid in agents_of(nodes.state("B")):
            os.kill(pid, signal.SIGKILL)
        out, err = migrating.communicate(timeout=DEADLINE)
    finally:
        migrating.kill()
    assert migrating.returncode == 1 and "Traceback" not in err, (out, err)
    error = json.loads(out)["error"]
    assert error["code"] == "migration_failed", error
    assert f"it stays on {nodes.address('A')} (running), and nothing of it is left on" in error["message"], error
    assert_left_on_the_source(nodes, "survivor", console)
    assert migration_status(nodes.state("A"), "survivor")["jobs"] == []
    nodes.ok("guest", "delete", "A", "survivor", "--force", "--remove-disks")


def test_the_connection_to_the_destination_cut_mid_migration_leaves_the_guest_on_the_source(
    nodes: Nodes, tiny_guest: TinyGuest
) -> None:
    console = counting_guest(nodes, tiny_guest, "cutoff", "--disk", "size=1G")
    write_pattern(nodes.state("A") / "guests" / "cutoff" / "disk0.qcow2")
    start_counting(nodes, "cutoff", console)
    with Listener("forward", forward_to=nodes.b.port) as network:
        through = f"root@127.0.0.1:{network.port}"
        migrating = subprocess.Popen(
            nodes.command("guest", "migrate", "A", "cutoff", through, "--bandwidth", "1", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:

            def mirroring() -> bool:
                jobs = migration_status(nodes.state("A"), "cutoff")["jobs"]
                return any(job["device"] == "mig-disk0" and job["offset"] > 0 for job in jobs)

            wait_until(mirroring, DEADLINE, "the disk's mirror to be on its way")
            network.cut()
            out, err = migrating.communicate(timeout=DEADLINE)
        finally:
            migrating.kill()
    assert migrating.returncode == 1 and "Traceback" not in err, (out, err)
    error = json.loads(out)["error"]
    assert error["code"] == "migration_failed", error
    assert f"it stays on {nodes.address('A')} (running); {through} could not be reached" in error["message"], error
    # B's agent saw its connection end and removed the arrival itself.
    wait_until(lambda: not (nodes.state("B") / "guests" / "cutoff").exists(), 60, "B to remove the arrival")
    assert_left_on_the_source(nodes, "cutoff", console)
    assert migration_status(nodes.state("A"), "cutoff")["jobs"] == []
    nodes.ok("guest", "delete", "A", "cutoff", "--force", "--remove-disks")


def test_a_running_guest_moves_straight_between_the_nodes_over_tls(
    nodes: Nodes, tiny_guest: TinyGuest, tmp_path: Path
) -> None:
    """--direct: the memory and the disk go from A's QEMU to B's over TCP with TLS, with credentials the
    client made for this migration (none left behind on either node afterwards)."""
    console = counting_guest(nodes, tiny_guest, "straight", "--disk", "size=1G", counter="tiny.counter=vda")
    write_pattern(nodes.state("A") / "guests" / "straight" / "disk0.qcow2")
    start_counting(nodes, "straight", console)
    before = counts(console)[-1]

    result = nodes.json("guest", "migrate", "A", "straight", "B", "--direct")

    assert (result["live"], result["route"], result["state"]) == (True, "direct", "running")
    assert result["disk_bytes"] >= GIB and "straight" not in nodes.guests("A")
    arrived = nodes.state("B") / "guests" / "straight"
    wait_until(lambda: len(counts(arrived / "console.log")) >= 2, DEADLINE, "the guest to count on at B")
    assert counts(arrived / "console.log")[0] > before
    with qmp_session(GuestFiles(arrived)) as client:
        objects = {entry["name"] for entry in client.execute("qom-list", {"path": "/objects"})}
        assert "mig-tls" not in objects  # the credentials are gone from QEMU too
        assert client.execute("query-migrate-parameters")["tls-creds"] == ""
    assert not list(arrived.glob(".*")) and not list(arrived.glob("*.pem"))
    nodes.ok("guest", "stop", "B", "straight")
    assert_pattern(raw_bytes(arrived / "disk0.qcow2", tmp_path))
    nodes.ok("guest", "delete", "B", "straight", "--remove-disks")


def test_evacuate_moves_every_guest_and_names_the_one_that_cannot_move(nodes: Nodes, tmp_path: Path) -> None:
    """Two guests move; one whose base image B has with other bytes stays on A, named; the exit is 1."""
    source = fresh_node(nodes, tmp_path)
    for path, fill in ((tmp_path / "a" / "evac-base.img", b"\x03"), (tmp_path / "b" / "evac-base.img", b"\x04")):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(fill * MIB)
    nodes.ok("image", "push", source, str(tmp_path / "a" / "evac-base.img"))
    nodes.ok("image", "push", "B", str(tmp_path / "b" / "evac-base.img"))
    nodes.ok("guest", "create", source, "evac-one", "--memory", "64", "--disk", "size=1G")
    nodes.ok("guest", "create", source, "evac-two", "--memory", "64", "--disk", "size=2G", "--nic", "user")
    nodes.ok("guest", "create", source, "evac-stays", "--memory", "64", "--disk", "image=evac-base.img")

    evacuated = nodes.cli("node", "evacuate", source, "--to", "B", "--json")

    assert evacuated.returncode == 1 and "Traceback" not in evacuated.stderr, evacuated.stderr
    outcomes = {outcome["name"]: outcome for outcome in json.loads(evacuated.stdout)}
    assert [name for name, outcome in outcomes.items() if outcome["ok"]] == ["evac-one", "evac-two"]
    assert outcomes["evac-stays"]["code"] == "migration_refused"
    assert "appliance: evac-stays: " in evacuated.stderr
    assert nodes.guests(source) == ["evac-stays"]
    assert {"evac-one", "evac-two"} <= set(nodes.guests("B"))
    for name in ("evac-one", "evac-two"):
        nodes.ok("guest", "delete", "B", name, "--remove-disks")


def fresh_node(nodes: Nodes, tmp_path: Path) -> str:
    """A third node (an sshd forcing an agent of its own, sharing A's key), so evacuate sees only the guests
    made here; its address (stopped at the end of the module)."""
    node = Sshd(tmp_path / "c" / "sshd", nodes.key.with_suffix(".pub").read_text().strip(), tmp_path / "c" / "state")
    node.start()
    nodes.extra.append(node)
    return f"root@127.0.0.1:{node.port}"
