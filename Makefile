PY ?= python

.PHONY: install test

install:
	$(PY) -m pip install -q -r requirements-dev.txt

test: install
	$(PY) -m pytest -q tests
