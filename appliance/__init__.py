"""appliance: build a minimal hypervisor appliance image and talk to its agent."""

# One version for the tool and the agent it ships; the agent keeps it because
# it is installed on the node without the rest of the package.
from appliance.agent import __version__

__all__ = ["__version__"]
