"""Fleet commands over several real sshd endpoints on loopback, one of them stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.keys import make_key
from helpers.sshd import Sshd

from appliance.nodes.client import NodeAddress
from appliance.nodes.fleet import InventoryError, load_inventory, parse_ini_inventory, parse_yaml_inventory


def test_ini_inventory_with_groups_vars_and_plain_hosts() -> None:
    entries = parse_ini_inventory(
        "plain1\n[hv]\nnode1 ansible_host=10.0.0.1 ansible_port=2222 ansible_user=ops # comment\n"
        "ops@node2:2200\n[hv:vars]\nsomething=1\n"
    )
    assert [entry.name for entry in entries] == ["plain1", "node1", "ops@node2:2200"]
    assert entries[1].address == NodeAddress("10.0.0.1", 2222, "ops")
    assert entries[2].address == NodeAddress("node2", 2200, "ops")


def test_yaml_inventory_with_children_and_a_plain_list() -> None:
    data = {"all": {"children": {"hv": {"hosts": {"n1": {"ansible_host": "10.0.0.9"}, "n2": None}}}}}
    entries = parse_yaml_inventory(data)
    assert [(e.name, e.address.host) for e in entries] == [("n1", "10.0.0.9"), ("n2", "n2")]
    assert [e.name for e in parse_yaml_inventory(["a", "b"])] == ["a", "b"]


def test_empty_or_unreadable_inventory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.ini").write_text("# nothing\n")
    with pytest.raises(InventoryError, match="no hosts"):
        load_inventory(tmp_path / "empty.ini")
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "missing.ini")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Sshd], Path]]:
    directory = tmp_path_factory.mktemp("fleet")
    key = make_key(directory, "operator")
    servers = [Sshd(directory / f"node{i}", key.with_suffix(".pub").read_text().strip(), directory / f"state{i}")
               for i in range(3)]  # fmt: skip
    for server in servers:
        server.start()
    servers[1].stop()
    yield servers, key
    for server in servers:
        server.stop()


def test_fleet_report_names_the_dead_node_and_reports_the_live_ones(
    fleet: tuple[list[Sshd], Path], tmp_path: Path
) -> None:
    servers, key = fleet
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[hv]\n" + "".join(f"root@127.0.0.1:{server.port}\n" for server in servers))
    common = [
        "-i",
        str(inventory),
        "--key",
        str(key),
        "--known-hosts",
        str(tmp_path / "known_hosts"),
        "--timeout",
        "20",
    ]
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "fleet", "report", *common],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 1
    dead = f"root@127.0.0.1:{servers[1].port}"
    assert f"appliance: {dead}: cannot reach" in result.stderr
    assert "2 of 3 nodes answered" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["HOST", "STATUS", "DETAIL"]
    assert sum(" ok " in line for line in lines) == 2

    as_json = subprocess.run([sys.executable, "-m", "appliance.cli", "fleet", "guests", "--json", *common],
                             capture_output=True, text=True, check=False)  # fmt: skip
    outcomes = {outcome["name"]: outcome for outcome in json.loads(as_json.stdout)}
    assert outcomes[dead]["ok"] is False
    assert outcomes[dead]["code"] == "connection_failed"
    assert [outcome["result"] for name, outcome in outcomes.items() if name != dead] == [[], []]
