# The two commands a newcomer needs (see README). Both set up .venv first (idempotent).
.PHONY: setup demo demo-offline test

setup:
	bash .ci/setup.sh

# Main job: Ray Serve + vLLM endpoint on the embedded tiny model, SERE on vs off, measured.
demo: setup
	.venv/bin/sere serve-demo

# Offline demo: in-process calibration and fidelity table (no Ray, no vLLM).
demo-offline: setup
	.venv/bin/sere demo

test: setup
	.venv/bin/python -m pytest -q --durations=15
