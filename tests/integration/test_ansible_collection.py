"""The Ansible collection through real ansible-core: three agents behind OpenSSH sshds on loopback and a fourth
inventory host on a dead port.

The collection is built with `ansible-galaxy collection build` and installed
into a temporary collections path, as an operator would. ansible-playbook runs
as a subprocess with its own HOME (known_hosts lands there) and the test's
operator key in APPLIANCE_SSH_KEY. What the playbooks did is checked with
the agent itself, on each node's state directory. The assertions run in
order (a module-scoped fleet): create, run again, check mode, remove.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.agent_process import AgentProcess
from helpers.ansible_runs import BIN, Run, install_collection
from helpers.keys import make_key
from helpers.sshd import Sshd, free_port
from helpers.waiting import wait_until

from appliance.agent.accel import PROBE_BOOT_SECTOR, PROBE_MARKER
from appliance.build.layout import REPOSITORY

PLAYBOOKS = Path(__file__).parent / "ansible"
# A disk of one sector does not boot under SeaBIOS; a megabyte does.
MARKER_GUEST_DISK = PROBE_BOOT_SECTOR.ljust(1 << 20, b"\0")
MARKER_SHA256 = hashlib.sha256(MARKER_GUEST_DISK).hexdigest()
NODES = ("node0", "node1", "node2")
DEAD = "dead"

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(), reason="ansible-core is not installed (pip install -e '.[dev]')"
)


@dataclass
class Fleet:
    directory: Path
    state_dirs: dict[str, Path]
    inventory: Path
    env: dict[str, str]
    extra_vars: list[str]

    def playbook(self, name: str, *args: str) -> Run:
        command = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(PLAYBOOKS / name), *self.extra_vars,
                   *args]  # fmt: skip
        done = subprocess.run(command, env=self.env, cwd=self.directory, capture_output=True, text=True, timeout=600)
        # Kept beside the fleet for a reader of a failure (pytest shortens long assertion messages).
        (self.directory / f"{name}{''.join(args).replace('/', '_')}.log").write_text(done.stdout + done.stderr)
        return Run(done.returncode, done.stdout, done.stderr)

    def agent(self, node: str, method: str, params: dict[str, Any] | None = None) -> Any:
        """The node's own agent, asked on its state directory (not through the collection)."""
        agent = AgentProcess(self.state_dirs[node])
        try:
            return agent.result(method, params)
        finally:
            agent.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("ansible")
    key = make_key(directory, "operator")
    public_key = key.with_suffix(".pub").read_text().strip()
    home = directory / "home"
    home.mkdir()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("ANSIBLE_", "SSH_AUTH_SOCK"))},
        "HOME": str(home),  # known_hosts lands in it
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "APPLIANCE_SSH_KEY": str(key),
        # The modules import `appliance` from the checkout under test.
        "PYTHONPATH": str(REPOSITORY),
    }
    env["ANSIBLE_COLLECTIONS_PATH"] = str(install_collection(directory, env))
    image = directory / "marker.img"
    image.write_bytes(MARKER_GUEST_DISK)
    other_image = directory / "other.img"
    other_image.write_bytes(MARKER_GUEST_DISK[:-1] + b"\1")
    state_dirs = {node: directory / f"{node}-state" for node in NODES}
    # The agent behind sshd would probe KVM first (slow here, and useless: it cannot run guests).
    servers = {node: Sshd(directory / node, public_key, state_dirs[node], extra_config="SetEnv APPLIANCE_ACCEL=tcg\n")
               for node in NODES}  # fmt: skip
    hosts = {node: server.port for node, server in servers.items()} | {DEAD: free_port()}  # nothing listens there
    inventory = directory / "hosts.ini"
    inventory.write_text("[hypervisors]\n" + "".join(
        f"{node} ansible_host=127.0.0.1 ansible_port={port} ansible_user=root\n" for node, port in hosts.items()
    ))  # fmt: skip
    extra_vars = ["-e", json.dumps({"image_file": str(image), "other_image_file": str(other_image),
                                    "operator_public_key": public_key})]  # fmt: skip
    try:
        for server in servers.values():
            server.start()
        yield Fleet(directory, state_dirs, inventory, env, extra_vars)
    finally:
        for server in servers.values():
            server.stop()
        for state_dir in state_dirs.values():
            if (state_dir / "guests").is_dir():
                sweeper = AgentProcess(state_dir)
                sweeper.kill_running_guests()
                sweeper.close()


def test_a_playbook_creates_the_image_and_guests_and_the_dead_node_fails_alone(fleet: Fleet) -> None:
    run = fleet.playbook("site.yml")
    recap = run.recap()
    for node in NODES:
        assert recap[node]["failed"] == 0, run
        assert recap[node]["changed"] == 3, run  # the image, web, db
    assert recap[DEAD]["failed"] == 1 and recap[DEAD]["ok"] == 0, run
    assert '"code": "connection_failed"' in run.stdout, run
    assert "Traceback" not in run.stdout + run.stderr, run
    for node in NODES:
        (image,) = fleet.agent(node, "image.list")
        assert image["sha256"] == MARKER_SHA256
        states = {guest["name"]: guest["state"] for guest in fleet.agent(node, "guest.list")}
        assert states == {"web": "running", "db": "stopped"}
        db = fleet.agent(node, "guest.info", {"name": "db"})["definition"]
        assert db["nics"][0]["mac"].startswith("52:") and db["restart"] == "on-failure"
        assert db["cloud_init"]["hostname"] == "db"
    wait_until(
        lambda: PROBE_MARKER.decode() in fleet.agent("node0", "guest.console", {"name": "web"})["text"],
        60,
        "web's marker on its console",
    )


def test_the_same_playbook_again_changes_nothing(fleet: Fleet) -> None:
    pids = {node: fleet.agent(node, "guest.info", {"name": "web"})["pid"] for node in NODES}
    run = fleet.playbook("site.yml")
    recap = run.recap()
    for node in NODES:
        assert recap[node]["failed"] == 0 and recap[node]["changed"] == 0, run
    assert recap[DEAD]["failed"] == 1, run
    assert {node: fleet.agent(node, "guest.info", {"name": "web"})["pid"] for node in NODES} == pids


def test_check_mode_predicts_a_change_and_makes_none_and_refusals_carry_codes(fleet: Fleet) -> None:
    before = {node: fleet.agent(node, "guest.info", {"name": "web"}) for node in NODES}
    run = fleet.playbook("changes.yml", "--check", "--diff", "-e", "web_memory=64")
    recap = run.recap()
    for node in NODES:
        # web's memory is the change; the refusals are ignored failures, asserted in the playbook.
        assert recap[node]["changed"] == 1 and recap[node]["failed"] == 0 and recap[node]["ignored"] == 4, run
    assert re.search(r'^-\s+"memory_mib": 32,$', run.stdout, re.MULTILINE), run
    assert re.search(r'^\+\s+"memory_mib": 64,$', run.stdout, re.MULTILINE), run
    for node in NODES:
        after = fleet.agent(node, "guest.info", {"name": "web"})
        assert after["definition"] == before[node]["definition"] and after["pid"] == before[node]["pid"]
        assert [guest["name"] for guest in fleet.agent(node, "guest.list")] == ["db", "web"]
        assert [image["sha256"] for image in fleet.agent(node, "image.list")] == [MARKER_SHA256]


def test_an_update_with_a_restart_then_state_absent_removes_guests_and_image(fleet: Fleet) -> None:
    run = fleet.playbook("absent.yml")
    recap = run.recap()
    for node in NODES:
        # web restarted with more memory, web and db removed, the image replaced and removed
        assert recap[node]["changed"] == 5 and recap[node]["failed"] == 0, run
        assert fleet.agent(node, "guest.list") == [] and fleet.agent(node, "image.list") == []
    assert recap[DEAD]["failed"] == 1, run
