"""The default appliance, built once by DIB and booted from its ISO in QEMU (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.tiny_guest import build_tiny_guest
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER
from appliance.build.pack.budget import MB
from appliance.build.render import READY_MARKER
from appliance.manifest import sha256_of
from appliance.nodes.client import Node, NodeAddress

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 900


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class BootedNode:
    out_dir: Path
    ssh_port: int
    key: Path
    boot_output: str

    def ssh(self, *command: str, user: str = "appliance", stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-p",
                str(self.ssh_port),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=30",
                f"{user}@127.0.0.1",
                *command,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def node(built_appliance: Path, operator_key: Path) -> Iterator[BootedNode]:
    result = appliance("boot", str(built_appliance), "--wait", "--timeout", str(BOOT_TIMEOUT))
    assert result.returncode == 0, result.stdout + result.stderr
    port = int((built_appliance / "run" / "ssh-port").read_text())
    try:
        yield BootedNode(built_appliance, port, operator_key, result.stdout)
    finally:
        appliance("stop", str(built_appliance))


def manifest_of(out_dir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out_dir / "manifest.json").read_text())


def test_manifest_matches_the_files_on_disk(built_appliance: Path) -> None:
    manifest = manifest_of(built_appliance)
    files = {artifact["file"] for artifact in manifest["artifacts"]}
    assert files == {
        "appliance.vmlinuz",
        "appliance.initrd",
        "appliance.squashfs",
        "appliance.iso",
        "appliance.raw",
        "appliance.qcow2",
        "appliance.ipxe",
    }
    for artifact in manifest["artifacts"]:
        path = built_appliance / artifact["file"]
        assert path.stat().st_size == artifact["size_bytes"]
        assert sha256_of(path) == artifact["sha256"]


def test_manifest_lists_the_packages_that_make_a_hypervisor(built_appliance: Path) -> None:
    manifest = manifest_of(built_appliance)
    names = {package["name"].split(":")[0] for package in manifest["packages"]}
    assert {"linux-image-amd64", "qemu-system-x86", "qemu-utils", "python3", "openssh-server", "live-boot"} <= names
    assert all(package["version"] for package in manifest["packages"])
    assert manifest["dib_version"] and manifest["build_seconds"] > 0
    assert len(manifest["spec_sha256"]) == 64


def test_every_artifact_is_within_the_default_budget(built_appliance: Path) -> None:
    for artifact in manifest_of(built_appliance)["artifacts"]:
        # The sparse raw disk is measured by its compressed twin, the qcow2.
        if not artifact["file"].endswith(".raw"):
            assert artifact["size_bytes"] <= 200 * MB, artifact


def test_build_keeps_its_log_and_leaves_no_work_tree(built_appliance: Path) -> None:
    assert "dib-run-parts" in (built_appliance / "build.log").read_text()
    assert not (built_appliance / ".work").exists()


def test_iso_boots_to_the_ready_marker(node: BootedNode) -> None:
    console = (node.out_dir / "run" / "serial.log").read_text(errors="replace")
    build_id = manifest_of(node.out_dir)["build_id"]
    ready = [line for line in console.splitlines() if READY_MARKER in line]
    assert len(ready) == 1 and f"build={build_id}" in ready[0]
    assert "SSH host key" in console and "ED25519" in console
    assert "ready after" in node.boot_output and "accelerator:" in node.boot_output


def agent_requests(node: BootedNode, *methods: str, command: str = "anything") -> list[dict]:  # type: ignore[type-arg]
    lines = "".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": m}) + "\n" for i, m in enumerate(methods))
    result = node.ssh(command, stdin=lines)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_agent_reports_over_ssh_with_the_operator_key(node: BootedNode) -> None:
    # Whatever command the client asks for, the key runs the agent's serve.
    hello, reply = agent_requests(node, "agent.hello", "host.report", command="sh -c 'echo not a shell'")
    assert hello["result"]["protocol"] == 1
    report = reply["result"]
    assert report["build_id"] == manifest_of(node.out_dir)["build_id"]
    assert report["hostname"] == "appliance"
    assert report["memory_total_bytes"] > 1_000_000_000
    assert report["kvm"]["present"] in (True, False)
    if "accelerator: tcg" in node.boot_output:
        # QEMU emulates the node: it knows, and does not try KVM on emulated SVM.
        assert report["accelerator"] == "tcg" and "emulated by QEMU" in report["accelerator_reason"]
    # Booted from the ISO: no data partition, and the report says so.
    assert report["state_storage"] == "ram" and report["state_device"] == ""


def test_break_glass_key_gets_a_root_shell(node: BootedNode) -> None:
    # The test build lists the operator key as a break-glass key too (conftest.py).
    result = node.ssh("sudo", "-n", "id", "-u", user="breakglass")
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr


def test_root_and_unknown_users_are_refused(node: BootedNode) -> None:
    assert node.ssh("true", user="root").returncode == 255
    assert node.ssh("true", user="nobody").returncode == 255


def test_node_booted_without_failed_units_and_the_agent_serves_guests(node: BootedNode) -> None:
    (reply,) = agent_requests(node, "guest.list")
    assert reply["result"] == []
    console = (node.out_dir / "run" / "serial.log").read_text(errors="replace")
    assert "FAILED" not in console


def test_guests_run_as_systemd_units_of_the_agent_user(node: BootedNode, tmp_path: Path) -> None:
    """Inside the appliance PID 1 is systemd: a nested (TCG in TCG) boot-sector guest runs as its unit."""
    image = tmp_path / "marker-guest.img"
    image.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    address = NodeAddress("127.0.0.1", node.ssh_port, "appliance")
    with Node(address, node.key, known_hosts=tmp_path / "known_hosts", timeout=120) as client:
        client.push_image(image, "marker-guest")
        guest = {"name": "unit-g", "memory_mib": 32, "disks": [{"base_image": "marker-guest"}],
                 "restart": "on-failure", "cpu_weight": 200}  # fmt: skip
        client.call("guest.create", guest)
        assert client.call("host.report")["guest_supervisor"] == "systemd"
        client.call("guest.start", {"name": "unit-g"})
        wait_until(
            lambda: PROBE_MARKER.decode() in client.call("guest.console", {"name": "unit-g"})["text"],
            300,
            "the nested guest's marker",
        )
        info = client.call("guest.info", {"name": "unit-g"})
        assert info["supervisor"] == "systemd" and info["unit"] == "appliance-guest-unit-g.service"
        assert info["user"] == "appliance"  # QEMU is never root
        assert info["cgroup"]["cpu.weight"] == "200" and info["cgroup"]["cpu.max"].startswith("max ")

        client.call("guest.set_cpu", {"name": "unit-g", "cpu_quota_percent": 50})
        assert client.call("guest.info", {"name": "unit-g"})["cgroup"]["cpu.max"] == "50000 100000"

        # A QEMU that dies (killed here through the break-glass shell) is started again by
        # systemd, as restart=on-failure asks; the agent sees the new process.
        crashed = info["pid"]
        killed = node.ssh("sudo", "-n", "kill", "-KILL", str(crashed), user="breakglass")
        assert killed.returncode == 0, killed.stderr

        def restarted() -> bool:
            now = client.call("guest.info", {"name": "unit-g"})
            return now["state"] == "running" and now["pid"] not in (None, crashed)

        wait_until(restarted, 120, "systemd to restart the killed guest")

        # The boot sector ignores ACPI: the unit's ExecStop waits, then systemd ends QEMU, and
        # the restart policy does not bring back a guest an operator stopped.
        assert client.call("guest.stop", {"name": "unit-g", "timeout": 2}) == {"name": "unit-g", "forced": True}
        assert client.call("guest.info", {"name": "unit-g"})["state"] == "stopped"
        client.call("guest.delete", {"name": "unit-g", "remove_disks": True})


def test_the_default_network_bridges_the_first_wired_nic_and_the_node_keeps_its_address_on_it(
    node: BootedNode, tmp_path: Path
) -> None:
    (reply,) = agent_requests(node, "host.report")
    report = reply["result"]
    (bridge,) = report["bridges"]
    assert bridge["name"] == "br0" and len(bridge["ports"]) == 1 and bridge["ports"][0].startswith(("en", "eth"))
    # The node's DHCP is on br0 now (its SSH, through QEMU's port forward, still answers: this request).
    assert [address.split(".")[:3] for address in report["addresses"]["br0"]] == [["10", "0", "2"]]
    assert report["network"] == "configured"
    console = (node.out_dir / "run" / "serial.log").read_text(errors="replace")
    assert "appliance: network: br0 has 10.0.2." in console
    # A clean boot: no error line from live-boot's networking (the node has no ifupdown).
    assert "can't create" not in console


def test_node_logs_reads_the_journal_through_the_agent(node: BootedNode, tmp_path: Path) -> None:
    address = NodeAddress("127.0.0.1", node.ssh_port, "appliance")
    with Node(address, node.key, known_hosts=tmp_path / "known_hosts", timeout=120) as client:
        lines = client.call("node.logs", {"unit": "appliance-network.service", "lines": 20})["lines"]
    assert any("br0 has 10.0.2." in line for line in lines), lines


def test_a_guest_on_br0_takes_a_lease_from_the_nodes_lan_and_the_node_reaches_it(
    node: BootedNode, tmp_path: Path
) -> None:
    """Nested (a Linux guest under TCG inside TCG, minutes): its NIC's tap on br0, made by the root
    tap helper, its DHCP answered by the outer QEMU's network as a LAN's server would."""
    tiny = build_tiny_guest(tmp_path / "tiny")
    address = NodeAddress("127.0.0.1", node.ssh_port, "appliance")
    with Node(address, node.key, known_hosts=tmp_path / "known_hosts", timeout=300) as client:
        client.push_image(tiny.kernel, "tiny-vmlinuz")
        client.push_image(tiny.initrd, "tiny-initrd")
        boot = {
            "kernel_image": "tiny-vmlinuz",
            "initrd_image": "tiny-initrd",
            "cmdline": f"{tiny.cmdline} tiny.serve=7000",
        }
        created = client.call(
            "guest.create", {"name": "lan", "memory_mib": 256, "nics": [{"bridge": "br0"}], "kernel_boot": boot}
        )
        client.call("guest.start", {"name": "lan"})

        def leased() -> str:
            found = re.search(
                r"tiny-address eth0 (10\.0\.2\.\d+)", client.call("guest.console", {"name": "lan"})["text"]
            )
            return found.group(1) if found else ""

        guest_ip = wait_until(leased, 900, "the nested guest's DHCP lease on br0")
        (bridge,) = client.call("host.report")["bridges"]
        assert len(bridge["ports"]) == 2  # the NIC and the guest's tap
        # ssh hands the remote shell one line: the command is quoted as one word.
        answer = node.ssh(f"bash -c 'exec 3<>/dev/tcp/{guest_ip}/7000; head -n 1 <&3'", user="breakglass")
        assert answer.stdout.startswith("tiny-hello"), (answer.stdout, answer.stderr)
        assert created["nics"][0]["mac"].startswith("52:")
        client.call("guest.kill", {"name": "lan"})
        # The tap went with QEMU.
        (bridge,) = client.call("host.report")["bridges"]
        assert len(bridge["ports"]) == 1
        client.call("guest.delete", {"name": "lan", "remove_disks": True})


VLAN_SCRIPT = r"""
set -eu
cleanup() {
    for end in a b c; do ip netns del "vt-$end" 2>/dev/null || true; ip link del "vt-$end" 2>/dev/null || true; done
}
trap cleanup EXIT
for spec in a:10:1 b:10:2 c:20:3; do
    end=${spec%%:*}; rest=${spec#*:}; vlan=${rest%%:*}; host=${rest#*:}
    ip netns add "vt-$end"
    ip link add "vt-$end" type veth peer name eth0 netns "vt-$end"
    ip link set "vt-$end" master br0 up
    bridge vlan del dev "vt-$end" vid 1
    bridge vlan add dev "vt-$end" vid "$vlan" pvid untagged
    ip -n "vt-$end" addr add "192.168.77.$host/24" dev eth0
    ip -n "vt-$end" link set eth0 up
done
ip netns exec vt-b python3 -c '
import socket; s = socket.socket(); s.bind(("192.168.77.2", 7000)); s.listen()
while True: c, _ = s.accept(); c.sendall(b"vlan-hello\n"); c.close()' &
ip netns exec vt-c python3 -c '
import socket; s = socket.socket(); s.bind(("192.168.77.3", 7000)); s.listen()
while True: c, _ = s.accept(); c.sendall(b"vlan-hello\n"); c.close()' &
for end in b c; do  # both listening, within 30 s
    for _ in $(seq 300); do ip netns exec "vt-$end" ss -ltn | grep -q ':7000 ' && break; sleep 0.1; done
done
reach() {
    ip netns exec vt-a python3 -c '
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], 7000), timeout=3).recv(64).decode().strip())
except OSError as error:
    print(f"unreachable: {error}")' "$1"
}
echo "same-vlan: $(reach 192.168.77.2)"
echo "other-vlan: $(reach 192.168.77.3)"
kill %1 %2
"""


def test_vlans_on_the_nodes_vlan_aware_bridge_keep_endpoints_apart_and_guests_get_theirs(
    node: BootedNode, tmp_path: Path
) -> None:
    """Network namespaces with veths on br0 as endpoints (cheaper than guests): on one VLAN
    they reach each other, across VLANs they do not. A guest's NIC on VLAN 10 gets it on its tap."""
    result = node.ssh("sudo -n bash -s", user="breakglass", stdin=VLAN_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "same-vlan: vlan-hello" in result.stdout, result.stdout
    assert "other-vlan: unreachable" in result.stdout, result.stdout
    image = tmp_path / "marker-guest.img"
    image.write_bytes(PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0"))
    address = NodeAddress("127.0.0.1", node.ssh_port, "appliance")
    with Node(address, node.key, known_hosts=tmp_path / "known_hosts", timeout=120) as client:
        client.push_image(image, "vlan-marker")
        client.call("guest.create", {"name": "on-vlan", "memory_mib": 32, "disks": [{"base_image": "vlan-marker"}],
                                     "nics": [{"bridge": "br0", "vlan": 10}]})  # fmt: skip
        client.call("guest.start", {"name": "on-vlan"})
        (bridge,) = client.call("host.report")["bridges"]
        assert bridge["vlan_filtering"] is True
        taps = [port for port in bridge["ports"] if port.startswith("vm")]
        assert len(taps) == 1 and bridge["vlans"][taps[0]] == [10]
        client.call("guest.kill", {"name": "on-vlan"})
        client.call("guest.delete", {"name": "on-vlan", "remove_disks": True})
