"""Named points inside multi-step changes where tests kill the agent, as a power cut or kill -9 would.

APPLIANCE_AGENT_CRASH_AT=NAME makes the agent SIGKILL itself on reaching
NAME. Tests use it to show that every prefix of every change is repaired by
the next agent (repair.py); it is never set on a node.
"""

from __future__ import annotations

import os
import signal

CRASH_AT = "APPLIANCE_AGENT_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
