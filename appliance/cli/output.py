"""Printing: tables and fields for people, JSON for scripts (failures included)."""

from __future__ import annotations

import json
import time
from typing import Any

from appliance.errors import ApplianceError
from appliance.nodes.errors import AgentCallError


def format_fields(data: dict[str, Any]) -> str:
    width = max((len(key) for key in data), default=0)
    return "\n".join(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict | list) else value}"
                     for key, value in sorted(data.items()))  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = [key for key in rows[0] if not isinstance(rows[0][key], dict | list)]
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def human_time(epoch: object) -> str:
    """A timestamp as people read it, in local time (JSON keeps the number)."""
    if not isinstance(epoch, int | float):
        return str(epoch)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def as_json(result: object) -> str:
    return json.dumps(result, indent=2, sort_keys=True)


def error_json(error: ApplianceError) -> str:
    """A failure for scripts: the agent's stable code and message when the agent answered, else the client's."""
    body: dict[str, Any] = {"code": error.code, "message": str(error)}
    if isinstance(error, AgentCallError):
        body["message"] = error.message
        if error.details:
            body["details"] = error.details
    return json.dumps({"error": body}, sort_keys=True)
