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
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchlab demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/batchlab bench losses

clean:
	rm -rf $(VENV) build *.egg-info
