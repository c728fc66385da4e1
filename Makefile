# hpcqml: `make demo` and `make test` do all the set-up themselves (env/install.sh) the
# first time, and nothing extra afterwards.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HPCQML := $(VENV)/bin/hpcqml
# One place for the MPI launcher: root needs --allow-run-as-root, more ranks than cores
# need --oversubscribe. Override for a cluster, e.g. `make test MPIEXEC=srun`.
MPIEXEC ?= mpirun $(if $(filter 0,$(shell id -u)),--allow-run-as-root) --oversubscribe
NP ?= 2
STAMP := $(VENV)/.hpcqml-installed
TEST_TIMEOUT ?= 1500
# The serial suite runs in TEST_WORKERS processes (pytest-xdist; each test file stays in one
# worker, so a module's fixtures are built once): the number of cores, at most 4.  With 1 it
# runs in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: install demo test test-serial test-mpi bench bench-gpu clean-results notebook lab
install: $(STAMP)

$(STAMP): setup.py env/install.sh
	bash env/install.sh
	touch $@

demo: $(STAMP)
	$(MPIEXEC) -n $(NP) $(HPCQML) run jobs/configs/demo.toml
	$(HPCQML) info results/demo.h5

test: $(STAMP)
	$(MAKE) --no-print-directory test-serial
	$(MAKE) --no-print-directory test-mpi

test-serial: $(STAMP)
	timeout $(TEST_TIMEOUT) $(PY) -m pytest tests -q -p no:cacheprovider \
	  $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# Every rank runs the same pytest session; a failure on any rank fails the run, and
# pytest-timeout turns a hang into a failure instead of a stuck job.
test-mpi: $(STAMP)
	for n in 2 3; do \
	  echo "== tests/mpi under $(MPIEXEC) -n $$n"; \
	  timeout $(TEST_TIMEOUT) $(MPIEXEC) -n $$n bash tests/mpi_pytest.sh $(PY) tests/mpi -q --color=no -p no:cacheprovider || exit 1; \
	done

bench: $(STAMP)
	bash benchmarks/run_all.sh

# Every row of BENCHMARKS.md's GPU tables on one CUDA device, in under 10 minutes.  Needs no
# venv: the GPU image's own python3 (GPU_PYTHON) with the repository on PYTHONPATH.
GPU_PYTHON ?= python3
bench-gpu:
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/gpu_all.py

# The analysis notebook.  `make notebook` runs it headless (no browser, no server) on
# $(NOTEBOOK_RESULTS), making the demo's results first when they are missing, and writes
# notebooks/analysis-executed.ipynb; `make lab` installs JupyterLab from PyPI into the venv
# the first time and opens the notebook in it.
NOTEBOOK_RESULTS ?= results/demo.h5
notebook: $(STAMP)
	@test -f "$(NOTEBOOK_RESULTS)" || $(MAKE) --no-print-directory demo
	HPCQML_RESULTS="$(abspath $(NOTEBOOK_RESULTS))" MPLBACKEND=Agg $(VENV)/bin/jupyter execute \
	  --output=analysis-executed notebooks/analysis.ipynb
	@echo "executed: notebooks/analysis-executed.ipynb (open it, or 'make lab' for a live session)"

lab: $(STAMP)
	$(VENV)/bin/python -c "import jupyterlab" 2>/dev/null || $(VENV)/bin/pip install -q "jupyterlab>=4,<5"
	HPCQML_RESULTS="$(abspath $(NOTEBOOK_RESULTS))" $(VENV)/bin/jupyter lab notebooks/analysis.ipynb

clean-results:
	find results -mindepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +

# The lint gate: ruff (ruff.toml: errors, bugbear, naming, docstrings, annotations on the
# kernels) and mypy over the numerical kernels' signatures (setup.cfg [mypy]).
# Mutation testing (mutmut) of the numerical kernels and writers, each in a scratch copy of the
# tree; prints the score and the surviving mutants. Not part of CI: tens of minutes on 2 cores
# (docs/testing.md). Pick targets with MUTATION_TARGETS="lanczos proxy statevector timestepping store".
.PHONY: mutation
mutation: $(STAMP)
	PY=$(abspath $(PY)) bash tests/mutation.sh

.PHONY: lint
lint: $(STAMP)
	$(VENV)/bin/ruff check hpcqml tests benchmarks
	$(VENV)/bin/mypy
