# `make demo` and `make test` work on a fresh machine: they create .venv if missing and install into it.
# torch is installed first, pinned by constraints.txt, so pip never pulls a CUDA build on a CPU machine
# (on a GPU box the same pin installs the CUDA build of that version).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tcompose-installed
PYTEST_ARGS ?= -n 2

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
# bnb: bitsandbytes runs its 8-bit AdamW on a CPU too, so --optimizer adamw8bit is tested, not skipped
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,bnb]"
# torch-fidelity: the reference the FID tests compare against (tests/evaluate/fid/test_inception.py). --no-deps
# because its dependencies would pull torchvision; the tests load only its standalone files, never the package.
	$(PY) -m pip install --quiet --no-deps torch-fidelity==0.4.0
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tcompose demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_step.py

clean:
	rm -rf demo-output .pytest_cache
