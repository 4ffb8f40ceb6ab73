"""Measurement: fidelity of routing rules on transformers models, the baselines, the all-to-all traffic
model, and the multi-node load generator."""
