"""The analytic per-rank memory model, its quantized-base extension, tables and report."""
