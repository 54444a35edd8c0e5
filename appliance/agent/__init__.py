"""The node agent: runs on the appliance, standard library only."""

__version__ = "0.1.0"
