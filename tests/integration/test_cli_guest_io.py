"""A guest's consoles, disks and install media from the command line, against a real agent behind sshd:
the serial console driven through a pseudo-terminal as an operator types into it, the display's VNC
greeting on a local port, disks added, grown and removed, an ISO as a CD-ROM and the boot order."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.keys import make_key
from helpers.relay import read_to_end, read_until
from helpers.sshd import Sshd
from helpers.tiny_guest import TINY_GUEST_MARKER, TinyGuest, build_tiny_guest
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER

DEADLINE = 120.0
Node = tuple[Sshd, list[str]]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("cli-io-node")
    key = make_key(directory)
    server = Sshd(directory / "sshd", key.with_suffix(".pub").read_text().strip(), directory / "state")
    server.start()
    common = ["--key", str(key), "--known-hosts", str(directory / "known_hosts")]
    yield server, common
    for guest in json.loads(ok((server, common), "guest", "list", "--json")):
        if guest["state"] != "stopped":
            cli((server, common), "guest", "kill", guest["name"])
    server.stop()


def command(node: Node, *args: str) -> list[str]:
    """`appliance NOUN VERB HOST REST...`: the node's address where "HOST" is, else after NOUN VERB."""
    server, common = node
    words = list(args) if "HOST" in args else [*args[:2], "HOST", *args[2:]]
    host = f"root@127.0.0.1:{server.port}"
    return [sys.executable, "-m", "appliance.cli", *(host if word == "HOST" else word for word in words), *common]


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(node, *args), capture_output=True, text=True, check=False, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def ok(node: Node, *args: str) -> str:
    result = cli(node, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))


class Terminal:
    """The CLI on a pseudo-terminal, as an operator runs it: stdin, stdout and stderr all the terminal."""

    def __init__(self, argv: list[str]) -> None:
        self.master, self.slave = pty.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.process = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                        start_new_session=True)  # fmt: skip
        self.seen = b""

    def expect(self, text: bytes, timeout: float = DEADLINE) -> bytes:
        self.seen = read_until(self.master, text, timeout, self.seen)
        return self.seen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 30) -> tuple[int, bytes]:
        """Its exit code and everything it wrote; `after`: the terminal's settings it left."""
        code = self.process.wait(timeout=timeout)
        self.after = termios.tcgetattr(self.slave)
        os.close(self.slave)  # the master then reads to the end of what was written
        rest = read_to_end(self.master, timeout)
        os.close(self.master)
        return code, self.seen + rest


@pytest.mark.slow
def test_a_line_typed_into_guest_console_reaches_the_guests_shell_and_ctrl_bracket_leaves(
    node: Node, tiny_guest: TinyGuest
) -> None:
    ok(node, "image", "push", str(tiny_guest.kernel), "--name", "tiny-vmlinuz")
    ok(node, "image", "push", str(tiny_guest.initrd), "--name", "tiny-initrd")
    ok(node, "guest", "create", "tiny", "--memory", "256", "--kernel", "tiny-vmlinuz", "--initrd", "tiny-initrd",
       "--cmdline", tiny_guest.cmdline)  # fmt: skip
    ok(node, "guest", "start", "tiny")
    # Without a terminal (a script), `guest console` is the log, as it always was.
    wait_until(lambda: TINY_GUEST_MARKER in ok(node, "guest", "console", "tiny"), DEADLINE, "the marker")

    operator = Terminal(command(node, "guest", "console", "tiny"))
    try:
        operator.expect(b"escape character is ^]")
        raw = termios.tcgetattr(operator.slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO  # raw while attached
        operator.type(b"echo $((6 * 7))-typed\r")
        operator.expect(b"42-typed")  # the shell's answer: the line was run
        operator.type(b"\x03")  # Ctrl-C goes to the guest and leaves the session be
        operator.type(b"echo still-$((2 + 3))\r")
        operator.expect(b"still-5")

        second = Terminal(command(node, "guest", "console", "tiny"))
        code, said = second.finish()
        assert code == 1 and b"console_busy" in said and b"one interactive attach at a time" in said
        assert b"Traceback" not in said and second.after == second.before
        # The log goes on meanwhile, and the first operator is still attached.
        assert "42-typed" in ok(node, "guest", "console", "tiny", "--log")
        operator.type(b"echo after-$((3 * 3))\r")
        operator.expect(b"after-9")

        operator.type(b"\x1d")  # Ctrl-]
        code, said = operator.finish()
    finally:
        if operator.process.poll() is None:
            operator.process.kill()
    assert code == 0, said
    assert operator.after == operator.before  # the terminal as it was
    assert b"Traceback" not in said


def test_guest_display_relays_qemus_vnc_greeting_to_a_local_port(node: Node, tmp_path: Path) -> None:
    image = tmp_path / "marker.img"
    image.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    ok(node, "image", "push", str(image))
    ok(node, "guest", "create", "shown", "--memory", "32", "--disk", "image=marker.img", "--display")
    ok(node, "guest", "create", "headless", "--memory", "32", "--disk", "image=marker.img")
    stopped = cli(node, "guest", "display", "shown", "--json")
    assert stopped.returncode == 1 and json.loads(stopped.stdout)["error"]["code"] == "guest_not_running"
    ok(node, "guest", "start", "shown")
    ok(node, "guest", "start", "headless")
    wait_until(lambda: PROBE_MARKER.decode() in ok(node, "guest", "console", "shown"), 60, "the marker")

    relay = subprocess.Popen(command(node, "guest", "display", "shown", "--once"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        assert relay.stdout is not None
        address = relay.stdout.readline().decode().strip()
        assert address.startswith("vnc://127.0.0.1:"), address
        port = int(address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as viewer:
            assert read_until(viewer.fileno(), b"\n", 30) == b"RFB 003.008\n"
        assert relay.wait(timeout=30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
    headless = cli(node, "guest", "display", "headless")
    assert headless.returncode == 1 and "no_display" in headless.stderr and "set display true" in headless.stderr
    for name in ("shown", "headless"):
        ok(node, "guest", "kill", name)


def make_iso(directory: Path) -> Path:
    tree = directory / "iso-tree"
    tree.mkdir()
    (tree / "README").write_text("an installer\n")
    iso = directory / "installer.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), str(tree)], check=True, capture_output=True)
    return iso


def test_disks_media_and_boot_order_from_the_command_line(node: Node, tmp_path: Path) -> None:
    disk_image = tmp_path / "raw-disk.img"
    disk_image.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    ok(node, "image", "push", str(disk_image))
    ok(node, "image", "push", str(make_iso(tmp_path)))
    listed = {image["name"]: image["kind"] for image in json.loads(ok(node, "image", "list", "--json"))}
    assert listed["installer.iso"] == "iso" and listed["raw-disk.img"] == "disk"
    assert "KIND" in ok(node, "image", "list")

    not_iso = cli(node, "guest", "create", "vm", "--memory", "32", "--cdrom", "raw-disk.img", "--json")
    assert not_iso.returncode == 1
    assert json.loads(not_iso.stdout)["error"] == {
        "code": "invalid_params",
        "message": "cdrom: image 'raw-disk.img' is a disk image, not an ISO (a CD-ROM needs kind iso)",
        "details": {"field": "cdrom"},
    }
    lacking = cli(node, "guest", "create", "vm", "--memory", "32", "--disk", "size=1G", "--boot", "disk,network")
    assert lacking.returncode == 1 and "boot_order[1]: the guest has no network to boot from" in lacking.stderr

    made = json.loads(ok(node, "guest", "create", "vm", "--memory", "32", "--disk", "size=1G", "--cdrom",
                         "installer.iso", "--boot", "cdrom,disk", "--display", "--json"))  # fmt: skip
    assert (made["cdrom"], made["boot_order"], made["display"]) == ("installer.iso", ["cdrom", "disk"], True)
    added = json.loads(ok(node, "guest", "disk", "add", "HOST", "vm", "--size", "2G", "--json"))
    assert (added["index"], added["size_gib"], added["attached"]) == (1, 2, "at start")
    grown = json.loads(ok(node, "guest", "disk", "grow", "HOST", "vm", "0", "--size", "3G", "--json"))
    assert grown["size_gib"] == 3 and grown["was_bytes"] == 1 << 30
    smaller = cli(node, "guest", "disk", "grow", "HOST", "vm", "0", "--size", "2G")
    assert smaller.returncode == 1 and "size_gib: disks[0] is 3 GiB already; a disk only grows" in smaller.stderr
    removed = ok(node, "guest", "disk", "remove", "HOST", "vm", "1")
    assert "kept_in" in removed
    definition = json.loads(ok(node, "guest", "info", "vm", "--json"))["definition"]
    assert [disk["size_gib"] for disk in definition["disks"]] == [3]
    edited = json.loads(ok(node, "guest", "edit", "vm", "--cdrom", "", "--boot", "", "--no-display", "--json"))
    assert edited["changed"] == ["boot_order", "cdrom", "display"]
    bad_size = cli(node, "guest", "disk", "add", "HOST", "vm", "--size", "big")
    assert bad_size.returncode == 2 and "not a disk size" in bad_size.stderr
    ok(node, "guest", "delete", "vm", "--remove-disks")
