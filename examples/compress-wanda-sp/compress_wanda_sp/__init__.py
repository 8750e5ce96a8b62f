"""Structured Wanda ("Wanda-sp") as a third-party compress plugin: the method lives in :mod:`.wanda_sp`."""
