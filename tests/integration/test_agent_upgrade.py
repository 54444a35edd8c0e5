"""An upgrade through a real agent and a real root helper (socket-activated per connection, as on the node)
onto a disk file; and through the operator's client over a real sshd.

The node here is a disk image file with small slots holding stand-in builds,
its data partition a directory (helpers/appliance_disk.py); everything between
the operator's bytes and the slot's ext4 is the code the node runs.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess, StartAgent
from helpers.ansible_runs import BIN, Run, install_collection
from helpers.appliance_disk import LifecycleNode, StandIn, grubenv, make_disk, slot_file, stand_in_build
from helpers.keys import make_key
from helpers.socket_activation import socket_activated
from helpers.sshd import Sshd

from appliance.agent.disklayout import DiskLayout
from appliance.agent.lifecycle_config import ENV_PATH
from appliance.manifest import (
    Artifact,
    Manifest,
    MissingArtifactError,
    NoBuildError,
    describe_artifacts,
    write_manifest,
)
from appliance.nodes import upgrade
from appliance.nodes.client import Node, NodeAddress
from appliance.nodes.upgrade import UpgradeError, UpgradeOptions, UpgradeOutcome, load_build, upgrade_node

OLD = "appliance-20260101T000000Z-aaaa0000"
NEW = "appliance-20260102T000000Z-bbbb1111"
PLAYBOOKS = Path(__file__).parent / "ansible"
HELPER = [sys.executable, "-m", "appliance.agent", "lifecycle-helper"]


@dataclass
class Node_:
    disk: Path
    layout: DiskLayout
    node: LifecycleNode
    new: StandIn
    env: dict[str, str]


@pytest.fixture
def lifecycle(tmp_path: Path) -> Iterator[Node_]:
    old = stand_in_build(tmp_path / "old", OLD)
    new = stand_in_build(tmp_path / "new", NEW, sizes=(300_000, 600_000, 1_800_000))
    disk = tmp_path / "disk.raw"
    layout = make_disk(disk, old)
    node = LifecycleNode(tmp_path / "node", disk, "a", OLD)
    env = {ENV_PATH: str(node.write())}
    with socket_activated(node.socket, HELPER, env):
        yield Node_(disk, layout, node, new, env)


def send(agent: AgentProcess, build: StandIn, name: str) -> dict[str, object]:
    data = build.files[name].read_bytes()
    params = {"file": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return agent.send_with_data("upgrade.send", params, data)


def test_an_upgrade_through_the_agent_lands_in_the_other_slot_armed(lifecycle: Node_, start_agent: StartAgent) -> None:
    agent = start_agent(env=lifecycle.env)
    prepared = agent.result("upgrade.prepare", {"build": lifecycle.new.describe()})
    assert prepared == {
        "noop": False, "slot": "b", "send": ["vmlinuz", "initrd.img", "filesystem.squashfs"], "staged": [],
        "running_guests": [],
    }  # fmt: skip
    for name in prepared["send"]:
        reply = send(agent, lifecycle.new, name)
        assert reply["result"]["file"] == name, reply  # type: ignore[index]
    committed = agent.result("upgrade.commit")
    assert committed["slot"] == "b" and committed["armed"] is True
    for name, path in lifecycle.new.files.items():
        assert slot_file(lifecycle.disk, lifecycle.layout, "appliance-b", name) == path.read_bytes()
    assert grubenv(lifecycle.disk, lifecycle.layout)["appliance_trial"] == "b"
    slots = agent.result("host.report")["slots"]
    assert slots["booted"] == "a" and slots["default"] == "a" and slots["armed"] == "b"
    assert slots["last_upgrade"]["result"] == "armed" and slots["slots"]["b"]["build_id"] == NEW
    # The same build again: nothing to send, it waits for the reboot.
    again = agent.result("upgrade.prepare", {"build": lifecycle.new.describe()})
    assert again["noop"] is True and again["armed"] is True


def test_a_file_the_helper_refuses_has_its_bytes_skipped_not_read_as_requests(
    lifecycle: Node_, start_agent: StartAgent
) -> None:
    agent = start_agent(env=lifecycle.env)
    smuggled = b'{"jsonrpc": "2.0", "id": 666, "method": "guest.create", "params": {"name": "x", "memory_mib": 32}}\n'
    # Nothing prepared: the helper refuses after the request line; the agent still reads the data away.
    params = {"file": "vmlinuz", "size_bytes": len(smuggled), "sha256": "0" * 64}
    reply = agent.send_with_data("upgrade.send", params, smuggled)
    assert reply["error"]["data"]["code"] == "upgrade_conflict"
    # A bad sha256 is refused by the agent itself, its data skipped the same way.
    reply = agent.send_with_data("upgrade.send", {**params, "sha256": "nope"}, smuggled)
    assert reply["error"]["data"]["code"] == "invalid_params"
    assert agent.call("agent.hello", request_id=7)["id"] == 7
    assert agent.result("guest.list") == []


def test_a_wrong_sha256_is_caught_by_the_node_and_the_connection_goes_on(
    lifecycle: Node_, start_agent: StartAgent
) -> None:
    agent = start_agent(env=lifecycle.env)
    agent.result("upgrade.prepare", {"build": lifecycle.new.describe()})
    data = lifecycle.new.files["vmlinuz"].read_bytes()
    right = hashlib.sha256(data).hexdigest()
    reply = agent.send_with_data("upgrade.send", {"file": "vmlinuz", "size_bytes": len(data), "sha256": right},
                                 b"X" + data[1:])  # fmt: skip
    assert reply["error"]["data"]["code"] == "invalid_params" or reply["error"]["data"]["code"] == "checksum_mismatch"
    assert agent.error_code("upgrade.commit") == "upgrade_conflict"
    assert agent.call("agent.hello")["result"]["protocol"] == 1


def test_refusals_name_what_is_wrong(lifecycle: Node_, start_agent: StartAgent) -> None:
    agent = start_agent(env=lifecycle.env)
    other = {**lifecycle.new.describe(), "name": "edge"}
    reply = agent.call("upgrade.prepare", {"build": other})
    assert reply["error"]["data"]["code"] == "build_refused" and "'edge'" in reply["error"]["message"]
    assert agent.error_code("upgrade.prepare", {"build": {"name": "appliance"}}) == "invalid_params"
    assert agent.error_code("upgrade.rollback") == "no_rollback"
    assert grubenv(lifecycle.disk, lifecycle.layout) == {"appliance_slot": "a", "appliance_trial": ""}


def test_without_the_helper_the_agent_says_the_node_cannot_upgrade(tmp_path: Path, start_agent: StartAgent) -> None:
    node = LifecycleNode(tmp_path / "node", tmp_path / "no-disk.raw")
    agent = start_agent(env={ENV_PATH: str(node.write())})
    reply = agent.call("upgrade.commit")
    assert reply["error"]["data"]["code"] == "helper_unavailable"
    assert "cannot install or upgrade" in reply["error"]["message"]
    smuggled = b'{"jsonrpc": "2.0", "id": 666, "method": "guest.create", "params": {"name": "x", "memory_mib": 32}}\n'
    sent = agent.send_with_data("upgrade.send", {"file": "vmlinuz", "size_bytes": len(smuggled), "sha256": "0" * 64},
                                smuggled)  # fmt: skip
    assert sent["error"]["data"]["code"] == "helper_unavailable"
    assert agent.result("guest.list") == []
    report = agent.result("host.report")
    assert report["slots"] is None and report["firstboot"] is None


def build_dir(directory: Path, build: StandIn, kernel_cmdline: str) -> Manifest:
    """A build directory as `appliance build` leaves one, with the stand-in build's live set."""
    directory.mkdir()
    paths = []
    for suffix, name in ((".vmlinuz", "vmlinuz"), (".initrd", "initrd.img"), (".squashfs", "filesystem.squashfs")):
        path = directory / f"appliance{suffix}"
        path.write_bytes(build.files[name].read_bytes())
        paths.append(path)
    artifacts: tuple[Artifact, ...] = describe_artifacts(paths)
    manifest = Manifest(name="appliance", build_id=build.build_id, created="", spec_sha256="", tool_version="",
                        dib_version="", release="trixie", ssh_user="appliance", kernel_cmdline=kernel_cmdline,
                        build_seconds=1.0, artifacts=artifacts, packages=())  # fmt: skip
    write_manifest(manifest, directory)
    return Manifest.load(directory)


def test_the_client_pushes_a_build_over_ssh_once(lifecycle: Node_, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    sshd = Sshd(tmp_path / "sshd", key.with_suffix(".pub").read_text(), tmp_path / "state", env=lifecycle.env)
    sshd.start()
    try:
        build = load_build_dir(tmp_path / "out", lifecycle.new)
        address = NodeAddress("127.0.0.1", sshd.port, "root")
        said: list[str] = []

        def connect(where: NodeAddress) -> Node:
            return Node(where, key, known_hosts=tmp_path / "known_hosts", timeout=60)

        outcome = upgrade_node(connect, address, build, UpgradeOptions(), said.append)
        assert outcome.slot == "b" and not outcome.noop and not outcome.rebooted
        assert outcome.sent_bytes == sum(path.stat().st_size for path in lifecycle.new.files.values())
        assert {"push", "write"} <= set(outcome.seconds)
        assert grubenv(lifecycle.disk, lifecycle.layout)["appliance_trial"] == "b"
        again = upgrade_node(connect, address, build, UpgradeOptions(), said.append)
        assert again.noop and again.sent_bytes == 0
    finally:
        sshd.stop()


def test_waiting_for_the_verdict_is_not_held_by_a_connection_that_gets_no_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rebooting node behind a port forward (QEMU's user network, a NAT): the TCP connect is accepted,
    # and no SSH banner comes on that connection. The upload's long timeout must not hold each poll.
    monkeypatch.setattr(upgrade, "POLL_TIMEOUT_SECONDS", 1.0)
    silent = socket.create_server(("127.0.0.1", 0))
    key = make_key(tmp_path)
    address = NodeAddress("127.0.0.1", silent.getsockname()[1], "root")
    outcome = UpgradeOutcome("127.0.0.1", NEW, rebooted=True)
    said: list[str] = []
    failed: list[BaseException] = []

    def connect(where: NodeAddress) -> Node:
        return Node(where, key, known_hosts=tmp_path / "known_hosts", timeout=300)

    def wait() -> None:
        try:
            upgrade.await_verdict(connect, address, outcome, OLD, 0.5, said.append)
        except BaseException as error:
            failed.append(error)

    waiting = threading.Thread(target=wait, daemon=True)
    try:
        waiting.start()
        waiting.join(60)
        assert not waiting.is_alive(), "a poll waited for the upload's 300 s timeout"
    finally:
        silent.close()
    assert len(failed) == 1 and isinstance(failed[0], UpgradeError), failed
    assert "did not judge the trial" in str(failed[0]) and "not answering" in str(failed[0])
    assert said == ["127.0.0.1: not answering (timeout)"]


def load_build_dir(directory: Path, build: StandIn):  # type: ignore[no-untyped-def]
    build_dir(directory, build, "boot=live toram=filesystem.squashfs quiet")
    return load_build(directory)


def test_a_build_directory_whose_files_do_not_match_its_manifest_is_refused_before_connecting(
    lifecycle: Node_, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    build_dir(out, lifecycle.new, "quiet")
    kept = (out / "appliance.initrd").read_bytes()
    (out / "appliance.initrd").write_bytes(b"changed")
    with pytest.raises(UpgradeError, match="does not match"):
        load_build(out)
    (out / "appliance.initrd").write_bytes(kept)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if not a["file"].endswith(".squashfs")]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MissingArtifactError, match="squashfs"):
        load_build(out)
    with pytest.raises(NoBuildError):
        load_build(tmp_path)


def test_a_connection_cut_mid_file_leaves_the_running_slot_and_a_rerun_sends_the_rest(
    lifecycle: Node_, start_agent: StartAgent
) -> None:
    first = start_agent(env=lifecycle.env)
    first.result("upgrade.prepare", {"build": lifecycle.new.describe()})
    assert "result" in send(first, lifecycle.new, "vmlinuz")
    squashfs = lifecycle.new.files["filesystem.squashfs"].read_bytes()
    params = {
        "file": "filesystem.squashfs",
        "size_bytes": len(squashfs),
        "sha256": hashlib.sha256(squashfs).hexdigest(),
    }
    line = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "upgrade.send", "params": params}).encode()
    assert first.process.stdin is not None
    first.process.stdin.write(line + b"\n" + squashfs[: len(squashfs) // 2])
    assert first.close() == 0  # the operator's connection is gone half way through the file
    assert grubenv(lifecycle.disk, lifecycle.layout) == {"appliance_slot": "a", "appliance_trial": ""}
    second = start_agent(env=lifecycle.env)
    assert second.result("host.report")["slots"]["slots"]["b"]["state"] == "writing"
    again = second.result("upgrade.prepare", {"build": lifecycle.new.describe()})
    assert again["send"] == ["initrd.img", "filesystem.squashfs"] and again["staged"] == ["vmlinuz"]
    for name in again["send"]:
        assert "result" in send(second, lifecycle.new, name)
    assert second.result("upgrade.commit")["armed"] is True
    assert slot_file(lifecycle.disk, lifecycle.layout, "appliance-b", "filesystem.squashfs") == squashfs


@pytest.mark.skipif(not (BIN / "ansible-playbook").exists(), reason="ansible-core is not installed")
def test_the_ansible_upgrade_module_arms_the_build_once_and_check_mode_writes_nothing(
    lifecycle: Node_, tmp_path: Path
) -> None:
    key = make_key(tmp_path)
    sshd = Sshd(tmp_path / "sshd", key.with_suffix(".pub").read_text(), tmp_path / "state", env=lifecycle.env)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "ANSIBLE_NOCOLOR": "1", "APPLIANCE_SSH_KEY": str(key),
           "PYTHONPATH": str(Path(__file__).parents[2])}  # fmt: skip
    env["ANSIBLE_COLLECTIONS_PATH"] = str(install_collection(tmp_path, env))
    build_dir(tmp_path / "out", lifecycle.new, "quiet")
    sshd.start()
    try:
        inventory = tmp_path / "hosts.ini"
        inventory.write_text(f"[hypervisors]\nnode ansible_host=127.0.0.1 ansible_port={sshd.port} ansible_user=root\n")
        variables = json.dumps({"build_dir": str(tmp_path / "out"), "new_build": NEW})
        runs: list[Run] = []

        def playbook(*args: str) -> Run:
            done = subprocess.run(
                [str(BIN / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOKS / "upgrade.yml"),
                 "-e", variables, *args],
                env=env, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            # Kept for a reader of a failure (pytest shortens long assertion messages).
            (tmp_path / f"upgrade{len(runs)}{''.join(args)}.log").write_text(done.stdout + done.stderr)
            runs.append(Run(done.returncode, done.stdout, done.stderr))
            return runs[-1]

        predicted = playbook("--check", "--diff")
        assert predicted.recap()["node"]["changed"] == 1 and predicted.recap()["node"]["failed"] == 0, predicted
        assert grubenv(lifecycle.disk, lifecycle.layout)["appliance_trial"] == ""
        done = playbook()
        assert done.recap()["node"]["changed"] == 1 and done.recap()["node"]["failed"] == 0, done
        assert grubenv(lifecycle.disk, lifecycle.layout)["appliance_trial"] == "b"
        again = playbook()
        assert again.recap()["node"]["changed"] == 0 and again.recap()["node"]["failed"] == 0, again
        assert "Traceback" not in predicted.stdout + done.stdout + again.stdout
    finally:
        sshd.stop()
