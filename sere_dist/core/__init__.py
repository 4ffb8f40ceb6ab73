"""The SERE core: settings, model fingerprint, similarity artifact, re-routing rules and their kernels.

Imports neither vLLM nor Ray: everything above (calibration, engine, serve, eval) builds on it.
"""
