# `make run` and `make test` set everything up on a fresh machine, then run.
PY := .venv/bin/python

.PHONY: setup run test test-fast docs docs-serve bench clean
setup: .venv/.setup-done

.venv/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: setup
	$(PY) -m harness run --searcher nevergrad

# The whole suite on both cores: one test file per worker at a time (pytest-xdist).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

# The edit loop: everything but the tests marked slow (end-to-end runs on ViT-B/32-shaped models,
# real Ray clusters, benchmark scripts); `make test` before committing.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# The docs site, built strictly (a broken link or a page out of the nav fails): build/site/.
docs: setup
	$(PY) scripts/gen_docs.py --check
	.venv/bin/mkdocs build --strict

docs-serve: setup
	.venv/bin/mkdocs serve

bench: setup
	$(PY) -m harness bench addition
