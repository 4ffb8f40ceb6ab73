"""Calibration: calibration text, model capture with transformers, the one pipeline (single process
or Ray Data) that turns text into a similarity artifact, its redundancy diagnostics (would re-routing
help this model?) and its report (stats tables, heatmaps)."""
