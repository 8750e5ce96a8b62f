"""TransAct pruning plugin for compress."""
