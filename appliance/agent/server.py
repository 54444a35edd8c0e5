"""`appliance-agent serve`: answers requests on stdin/stdout, one per line, until EOF.

This is the command SSH forces for operator keys, so the method table below is
everything an operator can reach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appliance.agent import __version__
from appliance.agent.host import collect_report
from appliance.agent.protocol import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PROTOCOL_VERSION,
    AgentError,
    error_message,
    parse_request,
    read_line,
    result_message,
)


@dataclass(frozen=True)
class ServerContext:
    state_dir: Path
    build_info_path: Path


Method = Callable[[ServerContext, dict[str, Any]], Any]


def no_params(params: dict[str, Any]) -> None:
    if params:
        raise AgentError(
            "invalid_params", f"this method takes no params (got {', '.join(sorted(params))})", INVALID_PARAMS
        )


def agent_hello(context: ServerContext, params: dict[str, Any]) -> dict[str, Any]:
    no_params(params)
    return {"protocol": PROTOCOL_VERSION, "agent_version": __version__, "methods": sorted(METHODS)}


def host_report(context: ServerContext, params: dict[str, Any]) -> dict[str, object]:
    no_params(params)
    return collect_report(context.build_info_path).to_json()


METHODS: dict[str, Method] = {
    "agent.hello": agent_hello,
    "host.report": host_report,
}


def handle_line(context: ServerContext, line: bytes) -> bytes:
    request_id: int | str | None = None
    try:
        request = parse_request(line)
        request_id = request.id
        method = METHODS.get(request.method)
        if method is None:
            raise AgentError("method_not_found", f"unknown method {request.method!r}", METHOD_NOT_FOUND)
        return result_message(request_id, method(context, request.params))
    except AgentError as error:
        return error_message(error.details.get("id", request_id), error)
    except Exception as error:
        # A bug in one method must not end the operator's connection; the
        # reply names the exception so the cause is not hidden.
        return error_message(
            request_id, AgentError("internal_error", f"{type(error).__name__}: {error}", INTERNAL_ERROR)
        )


def serve(context: ServerContext, requests: BinaryIO, replies: BinaryIO) -> None:
    while True:
        try:
            line = read_line(requests)
        except AgentError as error:
            replies.write(error_message(None, error))
            replies.flush()
            continue
        if line is None:
            return
        if not line.strip():
            continue
        replies.write(handle_line(context, line))
        replies.flush()
