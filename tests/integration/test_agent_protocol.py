"""The agent's serve protocol, driven through a real `appliance-agent serve` process."""

from __future__ import annotations

import pytest
from helpers.agent_process import AgentProcess

from appliance.agent.protocol import MAX_LINE_BYTES


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
