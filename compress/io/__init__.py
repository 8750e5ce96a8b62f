"""Files in and out: loading (safe), export (stock / compress format), checkpoints, the recipe file format."""
