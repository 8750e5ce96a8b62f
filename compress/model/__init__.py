"""Shapes, no data: architecture adapters, plans, structures, surgery, sizing, footprint, memory estimates."""
