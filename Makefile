# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv if it is missing, install batchlab into it (editable) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the package metadata changes; torch/torchvision come
# from the local disk through pip's constraint on this kind of machine.
$(STAMP): pyproject.toml | $(PY)
	@echo "installing batchlab and its test extras into $(VENV) (one to two minutes the first time; pip shows each step)"
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)
	@echo "installed: $(VENV)/bin/batchlab"

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchlab demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# writes under results/bench (git-ignored); the results the docs cite stay in benchmarks/results
bench: $(STAMP)
	$(VENV)/bin/batchlab bench losses --out results/bench

clean:
	rm -rf $(VENV) build *.egg-info
