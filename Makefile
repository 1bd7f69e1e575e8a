# `make run` and `make test` set everything up on a fresh machine, then run.
PY := .venv/bin/python

.PHONY: setup run test bench clean
setup: .venv/.setup-done

.venv/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: setup
	$(PY) -m harness run --searcher nevergrad

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m harness bench addition
