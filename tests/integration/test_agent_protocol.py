"""The agent's serve protocol, driven through a real `appliance-agent serve` process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.agent_process import AgentProcess, StartAgent

from appliance.agent.protocol import MAX_LINE_BYTES, UPLOAD_METHODS


def test_hello_names_protocol_version_and_methods(agent: AgentProcess) -> None:
    reply = agent.call("agent.hello", request_id=7)
    assert reply["id"] == 7 and reply["jsonrpc"] == "2.0"
    assert reply["result"]["protocol"] == 1
    assert {"agent.hello", "host.report"} <= set(reply["result"]["methods"])


def test_many_requests_on_one_connection_then_clean_exit(agent: AgentProcess) -> None:
    for request_id in range(20):
        assert agent.call("host.report", request_id=request_id)["result"]["cpus"] >= 1
    assert agent.close() == 0


BAD_INPUTS = [
    (b"not json", "parse_error", -32700),
    (b"[1, 2]", "invalid_request", -32600),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "agent.hello"}', "invalid_request", -32600),
    (b'{"jsonrpc": "2.0", "id": 1}', "invalid_request", -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', "invalid_request", -32600),
    (b'{"jsonrpc": "2.0", "id": {"x": 1}, "method": "agent.hello"}', "invalid_request", -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "agent.hello", "extra": true}', "invalid_request", -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "agent.hello", "params": [1]}', "invalid_params", -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "agent.hello", "params": {"x": 1}}', "invalid_params", -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "system.shell"}', "method_not_found", -32601),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "__class__"}', "method_not_found", -32601),
    (b"\xff\xfe", "parse_error", -32700),
    (b"x" * (MAX_LINE_BYTES + 10), "too_large", -32600),
]


@pytest.mark.parametrize(("line", "code", "rpc_code"), BAD_INPUTS, ids=[code for _, code, _ in BAD_INPUTS])
def test_bad_input_gets_its_error_code_and_the_connection_goes_on(
    agent: AgentProcess, line: bytes, code: str, rpc_code: int
) -> None:
    reply = agent.send_raw(line)
    assert "result" not in reply
    assert reply["error"]["data"]["code"] == code
    assert reply["error"]["code"] == rpc_code
    assert reply["error"]["message"]
    assert agent.call("agent.hello", request_id=99)["result"]["protocol"] == 1


def test_error_keeps_the_request_id_when_it_could_be_read(agent: AgentProcess) -> None:
    reply = agent.send_raw(b'{"jsonrpc": "2.0", "id": 42, "method": "nope"}')
    assert reply["id"] == 42


def test_all_bad_inputs_in_a_row_on_one_connection(agent: AgentProcess) -> None:
    codes = [agent.send_raw(line)["error"]["data"]["code"] for line, _, _ in BAD_INPUTS]
    assert codes == [code for _, code, _ in BAD_INPUTS]
    assert agent.call("host.report")["result"]["memory_total_bytes"] > 0


SMUGGLED = (
    b'{"jsonrpc": "2.0", "id": 666, "method": "guest.create", "params": {"name": "smuggled", "memory_mib": 32}}\n'
)
REFUSED_UPLOADS = {
    "wrong jsonrpc": {"jsonrpc": "1.0", "params": {"size_bytes": len(SMUGGLED)}},
    "params as a list": {"params": [len(SMUGGLED)]},
    "unknown field": {"extra": 1, "params": {"size_bytes": len(SMUGGLED)}},
    "bad id": {"id": {"x": 1}, "params": {"size_bytes": len(SMUGGLED)}},
    "no method string": {"method": ["image.import"], "params": {"size_bytes": len(SMUGGLED)}},
}


@pytest.mark.parametrize("method", UPLOAD_METHODS)
@pytest.mark.parametrize("envelope", REFUSED_UPLOADS.values(), ids=REFUSED_UPLOADS.keys())
def test_a_refused_upload_never_has_its_data_read_as_requests(
    agent: AgentProcess, start_agent: StartAgent, envelope: dict[str, object], method: str
) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": method, **envelope}
    if envelope.get("method") == ["image.import"]:
        request["method"] = [method]
    assert agent.process.stdin and agent.process.stdout
    agent.process.stdin.write(json.dumps(request).encode() + b"\n" + SMUGGLED)
    agent.process.stdin.flush()
    assert "error" in json.loads(agent.process.stdout.readline())
    # Either the data was skipped and the connection goes on, or the connection ended;
    # never is the line inside the data executed.
    try:
        after = agent.call("agent.hello", request_id=7)
    except (BrokenPipeError, json.JSONDecodeError):
        after = {}
    assert after.get("id") != 666
    assert start_agent().result("guest.list") == []


@pytest.mark.parametrize("method", UPLOAD_METHODS)
def test_a_refused_line_that_names_the_upload_method_but_cannot_be_read_ends_the_connection(
    agent: AgentProcess, start_agent: StartAgent, method: str
) -> None:
    assert agent.process.stdin and agent.process.stdout
    agent.process.stdin.write(b'{"method": "' + method.encode() + b'", "params": {"size_bytes": 1 \n' + SMUGGLED)
    agent.process.stdin.flush()
    assert json.loads(agent.process.stdout.readline())["error"]["data"]["code"] == "parse_error"
    assert agent.process.stdout.readline() == b""  # ended, the data unread
    assert start_agent().result("guest.list") == []


NESTED = {"lists": b"[" * 100_000 + b"]" * 100_000, "objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000}


@pytest.mark.parametrize("line", NESTED.values(), ids=NESTED.keys())
def test_deep_nesting_is_a_parse_error(agent: AgentProcess, line: bytes) -> None:
    reply = agent.send_raw(line)
    assert reply["error"]["data"]["code"] == "parse_error" and reply["error"]["code"] == -32700
    assert agent.call("agent.hello")["result"]["protocol"] == 1


BAD_NAMES = ["trail\n", "\nlead", "in\nside", "tab\t", "nul\0", "sp ace", "..", "x" * 64]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(name) for name in BAD_NAMES])
def test_names_are_matched_whole_everywhere_they_become_paths(agent: AgentProcess, state_dir: Path, name: str) -> None:
    assert agent.error_code("guest.create", {"name": name, "memory_mib": 32}) == "invalid_params"
    assert agent.import_image(name, b"data")["error"]["data"]["code"] == "invalid_params"
    for method in ("guest.start", "guest.info", "guest.delete", "image.delete"):
        assert agent.error_code(method, {"name": name}) == "invalid_params", method
    good = {"name": "ok", "memory_mib": 32, "disks": [{"base_image": name}]}
    assert agent.error_code("guest.create", good) == "invalid_params"
    assert agent.result("guest.list") == [] and agent.result("image.list") == []
    leftovers = [path.name for path in state_dir.rglob("*") if path.is_file() or path.is_dir()]
    assert not [entry for entry in leftovers if entry.strip() != entry or "\n" in entry]
