# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv, train LITv2 on the embedded digits (CPU, a few minutes)
#   make test         set up .venv, run the test suite, the data=shards end-to-end tests, the Triton-kernel tests
#                     (interpreter on CPU, compiled for sm_90), the inductor-compile tests,
#                     the tests under a live one-node and two-host SLURM cluster (skipped without slurm-wlm), timm's
#                     own model tests on litv2 and the GPU check's CPU smoke run
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(PY) train.py experiment=quickstart

test: $(STAMP)
	$(PY) -m pytest -q tests -m "not slurm and not inductor and not multinode and not shards and not triton"
	$(PY) -m pytest -q tests -m shards
	$(PY) -m pytest -q tests -m triton
	$(PY) -m pytest -q tests -m inductor
	$(PY) -m pytest -q tests -m slurm
	$(PY) -m pytest -q tests -m multinode
	$(PY) tests/timm_suite/run.py -q
	$(PY) scripts/gpu_check.py --smoke

# timm 1.0.31's own tests/test_models.py on the litv2 models (fetches timm's sdist into .cache/)
.PHONY: test-timm
test-timm: $(STAMP)
	$(PY) tests/timm_suite/run.py
