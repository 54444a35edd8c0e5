"""Runs the upgrade module on the controller, the node's address from the inventory (plugin_utils/node_action.py)."""

from __future__ import annotations

from ansible_collections.appliance.hypervisor.plugins.plugin_utils.node_action import NodeAction


class ActionModule(NodeAction):
    pass
