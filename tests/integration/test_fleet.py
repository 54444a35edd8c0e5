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


def test_a_malformed_inventory_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[hv]\nnode1 ansible_host=\n")
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "fleet", "report", "-i", str(inventory), "--json"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"inventory {inventory} line 2: ansible_host is empty" in result.stderr
    assert json.loads(result.stdout)["error"]["code"] == "inventory"
