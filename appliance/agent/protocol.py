"""Framing and message parsing of the agent protocol, apart from the methods that use it.

One JSON object per line, JSON-RPC 2.0 style. Every failure is an `AgentError`
carrying a stable machine-readable code (in `error.data.code`) next to the
JSON-RPC numeric code and a human message; the connection always goes on.

Two exceptions to lines, both announced by the request line itself:
- image.import: its line is followed by exactly `size_bytes` of raw data, then
  lines again (a refused import's data is skipped, or the connection ends).
- the relay methods (RELAY_METHODS): once one has answered with a result, the
  connection stops being requests for good; it carries raw bytes both ways (a
  serial console, a VNC display) until either side closes it, and then it
  ends. A relay request that is refused ends the connection after its error
  line, so bytes a client sent after it are never read as requests either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.agent.errors import AgentError, ErrorCode

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20
# The methods whose request line is followed by raw data (size_bytes of it): an image, an upgrade's file.
UPLOAD_METHODS = ("image.import", "upgrade.send")
# The methods whose result line is followed by a raw relay until the connection ends (a migration's
# streams and files among them: streams.py).
RELAY_METHODS = (
    "guest.console_attach",
    "guest.display_attach",
    "migration.source_stream",
    "migration.dest_stream",
    "migration.send_file",
    "migration.receive_file",
)


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
        raise AgentError(ErrorCode.TOO_LARGE, f"request line longer than {MAX_LINE_BYTES} bytes")
    return line.rstrip(b"\r\n")


def decode_json(line: bytes) -> Any:
    """The JSON value of a line; parse_error for anything else, too deep nesting included."""
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError) as error:
        raise AgentError(ErrorCode.PARSE_ERROR, f"not valid JSON: {error}") from error
    except RecursionError as error:
        raise AgentError(ErrorCode.PARSE_ERROR, "not valid JSON: nested too deeply") from error


def announced_upload(line: bytes) -> tuple[bool, int | None]:
    """Whether a request line announces raw data after it (UPLOAD_METHODS), and how many bytes.

    Asked of lines the request parser refused: their data must be skipped
    (size known) or the connection ended (size unknown), never read as
    requests. A line that does not parse but names the method counts as an
    upload of unknown size.
    """
    named = any(method.encode() in line for method in UPLOAD_METHODS)
    try:
        message = decode_json(line)
    except AgentError:
        return named, None
    if not isinstance(message, dict) or message.get("method") not in UPLOAD_METHODS:
        return named, None
    params = message.get("params")
    size = params.get("size_bytes") if isinstance(params, dict) else None
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return True, size
    return True, None


def announced_relay(line: bytes) -> bool:
    """Whether a request line (parsed or not) names a relay method: after it, raw bytes may follow."""
    return any(method.encode() in line for method in RELAY_METHODS)


@dataclass(frozen=True)
class Handover:
    """What a relay method answers: `result` for the reply line, then `relay(requests, replies)`
    moves raw bytes until either side closes; the connection ends after it."""

    result: Any
    relay: Callable[[BinaryIO, BinaryIO], None]


def parse_request(line: bytes) -> Request:
    message = decode_json(line)
    if not isinstance(message, dict):
        raise AgentError(ErrorCode.INVALID_REQUEST, "a request must be a JSON object")
    request_id = message.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, int | str)):
        raise AgentError(ErrorCode.INVALID_REQUEST, "id must be a string, a number or null")
    unknown = set(message) - {"jsonrpc", "id", "method", "params"}
    if message.get("jsonrpc") != "2.0":
        raise AgentError(ErrorCode.INVALID_REQUEST, 'jsonrpc must be "2.0"', {"id": request_id})
    if unknown:
        raise AgentError(ErrorCode.INVALID_REQUEST, f"unknown fields: {', '.join(sorted(unknown))}", {"id": request_id})
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise AgentError(ErrorCode.INVALID_REQUEST, "method must be a non-empty string", {"id": request_id})
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise AgentError(ErrorCode.INVALID_PARAMS, "params must be a JSON object", {"id": request_id})
    return Request(id=request_id, method=method, params=params)


def result_message(request_id: int | str | None, result: Any) -> bytes:
    return _encode({"jsonrpc": "2.0", "id": request_id, "result": result})


def notification_message(method: str, params: dict[str, Any]) -> bytes:
    """A message with no id, which needs no answer: progress ahead of a long method's result."""
    return _encode({"jsonrpc": "2.0", "method": method, "params": params})


def error_message(request_id: int | str | None, error: AgentError) -> bytes:
    data = {"code": error.code, **{key: value for key, value in error.details.items() if key != "id"}}
    return _encode(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": error.rpc_code, "message": error.message, "data": data}}
    )


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"
