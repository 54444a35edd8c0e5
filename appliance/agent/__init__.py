"""The node agent: runs on the appliance, standard library only."""
