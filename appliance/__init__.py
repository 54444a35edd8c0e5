"""appliance: build a minimal hypervisor appliance image and talk to its agent."""

__version__ = "0.1.0"
