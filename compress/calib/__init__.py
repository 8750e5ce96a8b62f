"""Calibration: text sources and seeded blocks, streaming statistics hooks, the whole-model and layer-wise passes, gradients."""
