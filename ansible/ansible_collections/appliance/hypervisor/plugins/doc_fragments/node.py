"""The options every module of the collection shares: how the node's agent is reached."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  node_host:
    description:
      - The node to talk to, as an address, a host name, or an alias from C(~/.ssh/config)
        (its C(HostName), C(User), C(Port) and C(IdentityFile) are honoured, as by the C(appliance) CLI).
      - Filled by the collection's action plugin from the inventory when not given, with
        C(ansible_host), else C(inventory_hostname).
    type: str
  node_port:
    description:
      - The node's SSH port.
      - Filled from C(ansible_port) when not given; without either, the port from C(~/.ssh/config), else 22.
    type: int
  node_user:
    description:
      - The user the operator key logs in as (the node forces every operator key to its agent).
      - Filled from C(ansible_user) when not given; without either, the user from C(~/.ssh/config), else C(appliance).
    type: str
  key_file:
    description:
      - The operator's private key. Without it, the key is found as C(ssh) finds it, as the C(appliance) CLI does
        (the C(APPLIANCE_SSH_KEY) environment variable, the host's C(IdentityFile), ssh-agent's keys,
        C(~/.ssh/id_ed25519), C(id_ecdsa), C(id_rsa)).
      - A passphrase-protected key is used through ssh-agent, or with C(APPLIANCE_SSH_PASSPHRASE) in the environment.
    type: path
  known_hosts:
    description:
      - The known_hosts file the node's host key is checked against and recorded in on first contact.
      - Defaults to C(~/.config/appliance/known_hosts), the one the C(appliance) CLI uses.
      - A changed key is always refused.
    type: path
  strict_host_key:
    description:
      - Refuse a node whose host key is not yet in O(known_hosts) instead of recording it.
    type: bool
    default: false
  node_timeout:
    description:
      - Seconds for each step of talking to the node (TCP connect, SSH handshake, authentication, each request).
      - A refused or reset connection is tried 3 times before the node is called unreachable
        (code C(connection_failed)).
    type: float
    default: 30
requirements:
  - >-
    The C(appliance) Python package (this project; it brings paramiko) importable by the Python that runs the module
    on the controller. The action plugin runs the modules with C(ansible_playbook_python) unless
    C(ansible_python_interpreter) is set for the host.
notes:
  - >-
    The modules run on the controller (C(connection: local) for the play, or C(delegate_to: localhost) for the task)
    and reach the node's agent over SSH with the operator key; nothing runs on the node but its agent.
    Use C(gather_facts: false), as the node has no shell to gather facts with.
  - >-
    A failure carries a stable error code in C(code), the agent's (such as C(guest_not_found) or
    C(policy_memory)) or the client's (such as C(connection_failed), C(auth_failed), C(host_key), C(timeout)),
    and the agent's error data in C(details).
"""

    # The attributes every module shares (ansible.builtin.action_common_attributes and .flow describe them).
    ATTRIBUTES = r"""
attributes:
  platform:
    platforms: posix
    details: Runs on the controller, which reaches the node over SSH.
  action:
    support: full
    details: The action plugin fills the node's address from the inventory and runs the module on the controller.
  async:
    support: none
  bypass_host_loop:
    support: none
"""
