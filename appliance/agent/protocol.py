"""Framing and message parsing of the agent protocol, apart from the methods that use it.

One JSON object per line, JSON-RPC 2.0 style. Every failure is an `AgentError`
carrying a stable machine-readable code (in `error.data.code`) next to the
JSON-RPC numeric code and a human message; the connection always goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20

# JSON-RPC 2.0 numeric codes; ours are in the server-error range.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
APPLICATION_ERROR = -32000


class AgentError(Exception):
    """A request failed; `code` is the stable name clients match on."""

    def __init__(
        self, code: str, message: str, rpc_code: int = APPLICATION_ERROR, details: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.rpc_code = rpc_code
        self.details = details or {}


@dataclass(frozen=True)
class Request:
    id: int | str | None
    method: str
    params: dict[str, Any]


def read_line(stream: BinaryIO) -> bytes | None:
    """The next line without its newline; None at end of stream.

    A line longer than MAX_LINE_BYTES is consumed to its end and raises
    `too_large`, so the next request is read cleanly.
    """
    line = stream.readline(MAX_LINE_BYTES + 1)
    if not line:
        return None
    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
        while True:
            rest = stream.readline(MAX_LINE_BYTES)
            if not rest or rest.endswith(b"\n"):
                break
        raise AgentError("too_large", f"request line longer than {MAX_LINE_BYTES} bytes", INVALID_REQUEST)
    return line.rstrip(b"\r\n")


def parse_request(line: bytes) -> Request:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as error:
        raise AgentError("parse_error", f"not valid JSON: {error}", PARSE_ERROR) from error
    if not isinstance(message, dict):
        raise AgentError("invalid_request", "a request must be a JSON object", INVALID_REQUEST)
    request_id = message.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, int | str)):
        raise AgentError("invalid_request", "id must be a string, a number or null", INVALID_REQUEST)
    unknown = set(message) - {"jsonrpc", "id", "method", "params"}
    if message.get("jsonrpc") != "2.0":
        raise AgentError("invalid_request", 'jsonrpc must be "2.0"', INVALID_REQUEST, {"id": request_id})
    if unknown:
        raise AgentError(
            "invalid_request", f"unknown fields: {', '.join(sorted(unknown))}", INVALID_REQUEST, {"id": request_id}
        )
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise AgentError("invalid_request", "method must be a non-empty string", INVALID_REQUEST, {"id": request_id})
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise AgentError("invalid_params", "params must be a JSON object", INVALID_PARAMS, {"id": request_id})
    return Request(id=request_id, method=method, params=params)


def result_message(request_id: int | str | None, result: Any) -> bytes:
    return _encode({"jsonrpc": "2.0", "id": request_id, "result": result})


def error_message(request_id: int | str | None, error: AgentError) -> bytes:
    data = {"code": error.code, **{key: value for key, value in error.details.items() if key != "id"}}
    return _encode(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": error.rpc_code, "message": error.message, "data": data}}
    )


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"
