# The two commands a newcomer needs (see README). Both set up .venv first (idempotent).
.PHONY: setup demo test

setup:
	bash .ci/setup.sh

demo: setup
	.venv/bin/sere demo

test: setup
	.venv/bin/python -m pytest -q
