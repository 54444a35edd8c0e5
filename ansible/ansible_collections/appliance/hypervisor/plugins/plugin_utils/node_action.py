"""The action plugin every module of the collection runs through, on the controller.

The modules talk to the node's agent over SSH themselves, so they must run on
the controller: this plugin refuses any connection but a local one, fills the
node's address options from the host's inventory variables (node_host from
ansible_host or inventory_hostname, node_port from ansible_port, node_user
from ansible_user) when the task does not give them, and runs the module with
the Python that runs ansible-playbook unless ansible_python_interpreter is
set for the host: that Python is the one that has the `appliance` package, as
ansible-core does for connections whose modules run on the controller.
"""

from __future__ import annotations

from typing import Any

from ansible.plugins.action import ActionBase

# option: the inventory variables it is filled from, in order.
INVENTORY_OPTIONS = {
    "node_host": ("ansible_host", "inventory_hostname"),
    "node_port": ("ansible_port",),
    "node_user": ("ansible_user",),
}
INTERPRETER = "ansible_python_interpreter"


class NodeAction(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        task_vars = task_vars or {}
        result: dict[str, Any] = super().run(tmp, task_vars)
        action = self._task.resolved_action or self._task.action
        if self._connection.transport != "local":
            result.update(
                failed=True,
                code="usage",
                msg=f"{action} runs on the controller and reaches the node's agent over SSH itself: give the play "
                "`connection: local` (or the task `delegate_to: localhost`); "
                f"this task's connection is {self._connection.transport!r}",
            )
            return result
        args = dict(self._task.args)
        for option, names in INVENTORY_OPTIONS.items():
            if args.get(option) is None:
                for name in names:
                    if task_vars.get(name) is not None:
                        args[option] = self._templar.template(task_vars[name])
                        break
        result.update(
            self._execute_module(module_name=action, module_args=args, task_vars=self._module_vars(task_vars))
        )
        return result

    def _module_vars(self, task_vars: dict[str, Any]) -> dict[str, Any]:
        """TASK_VARS with the controller's Python as the module's interpreter where the host names none. The
        module runs under the vars of the host it is delegated to, when it is."""
        python = task_vars.get("ansible_playbook_python")
        delegate = self._task.delegate_to
        if not python:
            return task_vars
        if not delegate:
            return task_vars if INTERPRETER in task_vars else {**task_vars, INTERPRETER: python}
        delegated = task_vars.get("ansible_delegated_vars", {}).get(delegate)
        if delegated is None or INTERPRETER in delegated:
            return task_vars
        return {
            **task_vars,
            "ansible_delegated_vars": {
                **task_vars["ansible_delegated_vars"],
                delegate: {**delegated, INTERPRETER: python},
            },
        }
