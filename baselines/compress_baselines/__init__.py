"""Comparison baselines for compress, each registered through the ``compress`` entry-point group."""
