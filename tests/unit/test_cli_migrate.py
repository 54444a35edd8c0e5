"""`guest migrate` and `node evacuate`: their help, and the progress line a terminal shows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.cli.migrate import line

MIB = 1 << 20


@pytest.mark.parametrize("verb", [("guest", "migrate"), ("node", "evacuate")])
def test_the_verbs_have_help_with_an_example(verb: tuple[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "appliance.cli", *verb, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "example:" in result.stdout and "--bandwidth" in result.stdout


def test_a_migration_without_its_destination_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "guest", "migrate", "node1", "web"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "DST" in result.stderr


def test_progress_says_what_moves_and_how_fast_the_guest_dirties_memory() -> None:
    memory = {"transferred": 120 * MIB, "remaining": 30 * MIB, "total": 512 * MIB,
              "dirty_bytes_per_second": 3 * MIB, "mbps": 800.0}  # fmt: skip
    disks = [{"drive": "disk0", "copied": 256 * MIB, "total": 1024 * MIB, "ready": False}]
    status = {"disks": disks, "memory": memory, "expected_downtime_ms": 45, "downtime_ms": None}
    assert line({"phase": "disks", **status}) == "mirroring disks: 25% of 1024 MiB"
    assert line({"phase": "memory", **status}) == (
        "memory: 120 MiB sent, 30 MiB to go, dirtied 3.0 MiB/s, expected downtime 45 ms"
    )
    assert line({"phase": "image", "image": "debian", "sent": MIB, "size": 4 * MIB}) == (
        "copying image debian: 25% of 4 MiB"
    )
    assert line({"phase": "completed", **status, "downtime_ms": 29}).endswith("downtime 29 ms")


def test_a_direct_address_without_direct_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "guest", "migrate", "node1", "web", "node2",
                             "--direct-address", "10.0.0.2"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "--direct-address goes with --direct" in result.stderr
