#!/usr/bin/python
"""The guest_info module: guests on an appliance node, in detail."""

from __future__ import annotations

DOCUMENTATION = r"""
module: guest_info
short_description: Guests on an appliance node, with their definitions and state
version_added: 0.1.0
description:
  - The agent's C(guest.info) for one guest, or for every guest on the node. Changes nothing.
extends_documentation_fragment:
  - appliance.hypervisor.node
  - appliance.hypervisor.node.attributes
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  name:
    description: One guest; without it, every guest. A guest the node does not have gives an empty list.
    type: str
  console_bytes:
    description: Add the last this many bytes of each guest's serial console (C(guest.console)) as C(console).
    type: int
    default: 0
seealso:
  - module: appliance.hypervisor.guest
  - module: appliance.hypervisor.node_info
author:
  - The appliance project (!UNKNOWN)
"""

EXAMPLES = r"""
- name: One guest
  appliance.hypervisor.guest_info:
    name: web
  register: web

- name: Its state
  ansible.builtin.debug:
    msg: "web is {{ web.guests[0].state }}"
  when: web.guests | length > 0

- name: Every guest, with the end of its console
  appliance.hypervisor.guest_info:
    console_bytes: 2048
  register: everything
"""

RETURN = r"""
guests:
  description: The agent's C(guest.info) of each guest, with C(console) when O(console_bytes) is given.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The guest's name.
      type: str
    state:
      description: What QEMU says the guest is doing (V(running), V(paused), ...), or V(stopped).
      type: str
    pid:
      description: QEMU's process id while it runs, else null.
      type: int
    definition:
      description: The guest's stored definition.
      type: dict
    console:
      description: The end of the guest's serial console (with O(console_bytes)).
      type: str
code:
  description: The failure's stable code (the agent's, or the client's such as C(connection_failed)).
  returned: failed
  type: str
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.appliance.hypervisor.plugins.module_utils.node import (
    NodeSession,
    node_argument_spec,
    run_module,
)


def run(module: AnsibleModule, session: NodeSession) -> dict[str, Any]:
    name = module.params["name"]
    if name is None:
        names = [guest["name"] for guest in session.call("guest.list", idempotent=True)]
    else:
        names = [name]
    guests = []
    for each in names:
        info = session.guest_info(each)
        if info is None:  # asked for by name and missing, or deleted since the list
            continue
        if module.params["console_bytes"] > 0:
            params = {"name": each, "max_bytes": module.params["console_bytes"]}
            info["console"] = session.call("guest.console", params, idempotent=True)["text"]
        guests.append(info)
    return {"changed": False, "guests": guests}


def main() -> None:
    module = AnsibleModule(
        argument_spec=node_argument_spec(
            name={"type": "str"},
            console_bytes={"type": "int", "default": 0},
        ),
        supports_check_mode=True,
    )
    run_module(module, lambda session: run(module, session))


if __name__ == "__main__":
    main()
