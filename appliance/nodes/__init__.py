"""The operator's side: one node's agent over SSH, and many nodes at once."""
