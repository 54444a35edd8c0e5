# The system user that owns guests and answers operators.
export DIB_APPLIANCE_AGENT_USER=${DIB_APPLIANCE_AGENT_USER:-appliance}
# Directory of the agent package (appliance/agent/ in the repository); set by
# the builder. Required.
export DIB_APPLIANCE_AGENT_SRC=${DIB_APPLIANCE_AGENT_SRC:-}
