# The kit's two entry points: `make demo` and `make test`. Each creates .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	@echo "make demo: not built yet. The offline end-to-end demo (00_make_demo_data.py -> 06_export_hf.py)"
	@echo "arrives with the data, clustering, training and evaluation stages; see README.md, 'Status'."

bench: $(VENV)/.installed
	$(PY) bench/bench_encoder.py --preset tiny --device cpu
	$(PY) bench/bench_bank.py

clean:
	rm -rf $(VENV) .pytest_cache
