# `make demo` and `make test` each create .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test test-slow bench lint clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e ".[dev]"
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) tools/demo.py

test: $(VENV_STAMP)
	$(PY) -m pytest -q

test-slow: $(VENV_STAMP)
	$(PY) -m pytest -q -m slow

bench: $(VENV_STAMP)
	$(PY) tools/benchmark.py kernels

lint: $(VENV_STAMP)
	.venv/bin/ruff check kd_bnn tools tests

clean:
	rm -rf runs build .pytest_cache
