# Two entry points for a fresh clone: `make derivations` and `make test`.
# Both create or refresh the project's virtual environment (.venv) first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
OPS     ?=
PROFILE ?= ci

.PHONY: venv derivations check test bench mutants clean

venv: $(STAMP)

# torch is pinned to the CPU build on disk when absent: a bare `torch` would pull
# several GB of CUDA wheels; the project itself only asks for torch>=2.4.
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==2.13.0"
	@$(VPY) -m pip install -q -e ".[test,plot]"
	@touch $(STAMP)

derivations: $(STAMP)
	$(VPY) -m derivations $(if $(OPS),--ops $(OPS),)

check: $(STAMP)
	$(VPY) -m derivations --check

# JOBS pytest-xdist workers (the suite is CPU-bound; one BLAS / OpenMP thread per worker)
JOBS    ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 TRITON_INTERPRET=1 HYPOTHESIS_PROFILE=$(PROFILE) \
		$(VPY) -m pytest -n $(JOBS) property_tests

bench: $(STAMP)
	$(VPY) -m kernels.bench

# The mutation catalogue (slow, so outside `make test`): every deliberate bug of
# mutants/catalogue.py applied to a copy of the tree and its tests run there; writes
# docs/mutants.{md,json}. MUTANTS="--only ID" / "--area kernel" / "-j 2" / "--rev HEAD".
mutants: $(STAMP)
	$(VPY) -m mutants $(MUTANTS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
