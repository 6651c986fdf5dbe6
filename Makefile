# Two set-up commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair that imports together on these machines (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DATA_DIR ?= $(abspath ../shared/data)
MODELS_DIR ?= $(abspath ../shared/models)
# The main job: all three workloads, throughput, time-to-target and baselines (a few minutes on 2 cores).
RUN_SUITE ?= cpu_quick

.PHONY: install run lint test test-long test-fast test-matrix test-slurm wheel clean

# The stamp is newer than pyproject.toml when the venv is current: then `install` does nothing.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'  # test = every extra (all) + pytest: what run and test need
	touch $@

install: $(VENV)/.installed

run: install
	DLTRAIN_DATA_DIR=$${DLTRAIN_DATA_DIR:-$(DATA_DIR)} DLTRAIN_MODELS_DIR=$${DLTRAIN_MODELS_DIR:-$(MODELS_DIR)} \
		$(PY) -m dltrain bench $(RUN_SUITE)

# The linter and the formatter as configured in pyproject.toml (`ruff format .` rewrites what --check finds).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers, one test file each at a time (module fixtures are built once), one thread per
# process: two runs of 2 threads on 2 cores would wait on each other's OpenMP barriers.
TEST_WORKERS ?= 2
test: install lint
	DLTRAIN_DATA_DIR=$${DLTRAIN_DATA_DIR:-$(DATA_DIR)} DLTRAIN_MODELS_DIR=$${DLTRAIN_MODELS_DIR:-$(MODELS_DIR)} \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 -m "not long and not slurm" tests

# The long tier (marker `long`: a test that takes 15 s or more here, such as a training to its accuracy
# target or a multi-job end-to-end), kept out of make test to hold it under 15 minutes on 2 cores.
test-long: install
	DLTRAIN_DATA_DIR=$${DLTRAIN_DATA_DIR:-$(DATA_DIR)} DLTRAIN_MODELS_DIR=$${DLTRAIN_MODELS_DIR:-$(MODELS_DIR)} \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 -m long tests

# The strategy x compile x precision matrix off make test's diagonal (tests/distributed/test_matrix.py): 15 cells
# of 2-process jobs, its own CI step. Each cell's outcome is merged into $(MATRIX_RESULTS), which
# benchmarks/matrix_table.py renders (and writes into README.md with --readme README.md).
MATRIX_RESULTS ?= $(abspath runs/matrix.json)
test-matrix: install
	DLTRAIN_DATA_DIR=$${DLTRAIN_DATA_DIR:-$(DATA_DIR)} DLTRAIN_MODELS_DIR=$${DLTRAIN_MODELS_DIR:-$(MODELS_DIR)} \
		DLTRAIN_MATRIX=full DLTRAIN_MATRIX_RESULTS=$${DLTRAIN_MATRIX_RESULTS:-$(MATRIX_RESULTS)} \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m matrix_full --durations=0 tests/distributed/test_matrix.py

# The SLURM tests (tests/distributed/test_slurm.py): the shipped launch/slurm.sbatch on a real two-node cluster on
# this host, brought up before (slurm-wlm and munge installed when missing: root, or sudo) and down after,
# whatever the tests did. Their own CI step: a requeued job waits about two minutes to start again.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-slurm: install
	$(SUDO) tests/slurm/cluster.sh up
	DLTRAIN_DATA_DIR=$${DLTRAIN_DATA_DIR:-$(DATA_DIR)} DLTRAIN_MODELS_DIR=$${DLTRAIN_MODELS_DIR:-$(MODELS_DIR)} \
		DLTRAIN_SLURM=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -s -m slurm --durations=0 tests/distributed/test_slurm.py; \
		status=$$?; $(SUDO) tests/slurm/cluster.sh down; exit $$status

test-fast: install
	DLTRAIN_DATA_DIR=$${DLTRAIN_DATA_DIR:-$(DATA_DIR)} DLTRAIN_MODELS_DIR=$${DLTRAIN_MODELS_DIR:-$(MODELS_DIR)} $(PY) -m pytest -q -m "not slow and not distributed and not long and not slurm" tests

# dist/dltrain-*.whl, built from a copy of the source: setuptools writes build/ and
# dltrain.egg-info/ beside the source it builds (`pip wheel .` leaves them in the checkout; they are
# in .gitignore), so the checkout stays as it was. tar keeps dltrain/'s links to recipes/ and the rest.
WHEEL_SOURCE := pyproject.toml README.md dltrain recipes launch benchmarks/suites benchmarks/baselines
WHEEL_FLAGS ?=
wheel:
	tmp=$$(mktemp -d) && tar -cf - --exclude=__pycache__ $(WHEEL_SOURCE) | tar -xf - -C $$tmp && \
		$(PYTHON) -m pip wheel -q --no-deps $(WHEEL_FLAGS) -w dist $$tmp; status=$$?; rm -rf $$tmp; exit $$status

clean:
	rm -rf $(VENV) runs
