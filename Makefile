# The two commands of README.md. Both bootstrap .venv on a fresh machine.
VENV ?= .venv
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: demo test bench clean-venv

$(STAMP): scripts/bootstrap.sh requirements.txt constraints.txt pyproject.toml
	VENV=$(VENV) bash scripts/bootstrap.sh

demo: $(STAMP)  ## the quickstart pipeline on embedded Ray
	$(VENV)/bin/r2v run --config conf/quickstart.yaml

test: $(STAMP)  ## the test suite (CPU, local Ray)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python -m bench.all

clean-venv:
	rm -rf $(VENV)
