"""image.import / list / delete through a real agent: uploads are all or nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers.agent_process import AgentProcess, StartAgent

DATA = bytes(range(256)) * 4096


def store_files(tmp_path: Path) -> list[str]:
    images = tmp_path / "state" / "images"
    return sorted(path.name for path in images.iterdir()) if images.exists() else []


def test_import_then_list_then_delete(agent: AgentProcess, start_agent: StartAgent, tmp_path: Path) -> None:
    reply = agent.import_image("base", DATA)
    assert reply["result"] == {"name": "base", "size_bytes": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
    assert (tmp_path / "state" / "images" / "base").read_bytes() == DATA
    listed = agent.result("image.list")
    assert [(image["name"], image["size_bytes"]) for image in listed] == [("base", len(DATA))]
    assert agent.error_code("image.import", {}) == "invalid_params"  # no size: answered, then closed
    second = start_agent()
    assert second.result("image.delete", {"name": "base"}) == {"name": "base", "deleted": True}
    assert second.result("image.list") == [] and store_files(tmp_path) == []


def test_checksum_mismatch_leaves_nothing_and_the_connection_goes_on(agent: AgentProcess, tmp_path: Path) -> None:
    params = {"name": "bad", "size_bytes": len(DATA), "sha256": "0" * 64}
    assert agent.send_with_data("image.import", params, DATA)["error"]["data"]["code"] == "checksum_mismatch"
    assert store_files(tmp_path) == [] and agent.result("image.list") == []
    assert agent.result("agent.hello")["protocol"] == 1


def test_interrupted_upload_leaves_nothing(agent: AgentProcess, tmp_path: Path) -> None:
    params = {"name": "cut", "size_bytes": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "image.import", "params": params}).encode()
    assert agent.process.stdin and agent.process.stdout
    agent.process.stdin.write(line + b"\n" + DATA[: len(DATA) // 2])
    agent.process.stdin.close()
    reply = json.loads(agent.process.stdout.readline())
    assert reply["error"]["data"]["code"] == "upload_incomplete"
    assert agent.process.wait(timeout=30) == 0
    assert store_files(tmp_path) == []


def test_bad_name_skips_the_data_and_the_connection_goes_on(agent: AgentProcess, tmp_path: Path) -> None:
    params = {"name": "../escape", "size_bytes": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
    assert agent.send_with_data("image.import", params, DATA)["error"]["data"]["code"] == "invalid_params"
    assert agent.result("agent.hello")["protocol"] == 1
    assert store_files(tmp_path) == [] and not (tmp_path / "state" / "escape").exists()


def test_an_image_in_use_cannot_be_deleted(agent: AgentProcess) -> None:
    agent.import_image("base", DATA)
    agent.result("guest.create", {"name": "g", "memory_mib": 32, "disks": [{"base_image": "base"}]})
    assert agent.error_code("image.delete", {"name": "base"}) == "image_in_use"
    assert agent.import_image("base", DATA)["error"]["data"]["code"] == "image_exists"
