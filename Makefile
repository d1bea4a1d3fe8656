# Set-up and checks. `make test` works on a fresh machine: it creates the virtual environment,
# installs the project and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch (a GPU cluster image installs the CUDA build instead,
# see infra/). Set TORCH_SPEC="torch" to let pip choose.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test lint demo clean mutants faults multinode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(VENV)/torch-constraint.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	PATH="$(abspath $(BIN)):$$PATH" RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole fault-injection suite, long cases included (tests/faults/, see README "Reliability").
faults: install
	PATH="$(abspath $(BIN)):$$PATH" RAY_USAGE_STATS_ENABLED=0 QMAG_FAULTS_LONG=1 $(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check qmag_ray tests jobs
	$(BIN)/ruff format --check qmag_ray tests jobs

clean:
	rm -rf $(VENV) .pytest_cache

# The whole system on embedded defaults: synthetic faces, embeddings with the bundled demo model
# on a local Ray, calibration + held-out evaluation, MLflow (demo-out/mlflow.db), champion alias.
# Earlier runs are kept: each run calibrates into demo-out/calibration/run-<time>/ and adds to the
# same MLflow store (images and embeddings are reused); delete demo-out to start over.
demo: install
	PATH="$(abspath $(BIN)):$$PATH" RAY_USAGE_STATS_ENABLED=0 $(BIN)/qmag-ray demo --output demo-out

# Mutation testing of the numeric core (scores, FMR primitives, calibration search and order
# statistics, metrics) and the gate with the fast tests that cover them; NOT part of `make test`
# (see README "Mutation testing" for the time it takes). Configured in pyproject.toml
# [tool.mutmut]; MUTMUT_DESELECT leaves out the three slowest calibration tests (seconds for
# every surviving mutant; faster tests cover the same code). First the review's mutants (must
# all be killed), then mutmut, then the ratio.
MUTMUT_DESELECT := -p no:unraisableexception --deselect "tests/test_calibration.py::test_parity_with_the_published_algorithm[continuous-paper-grid]" --deselect tests/test_calibration.py::test_parity_with_scikit_learn_default_roc_simplification --deselect tests/test_calibration.py::test_shards_and_blocks_do_not_change_the_result_in_process
mutants: install
	PATH="$(abspath $(BIN)):$$PATH" RAY_USAGE_STATS_ENABLED=0 $(BIN)/python tests/mutation/review_mutants.py
	rm -rf mutants
	PYTEST_ADDOPTS='$(MUTMUT_DESELECT)' PATH="$(abspath $(BIN)):$$PATH" RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg nice -n 19 $(BIN)/mutmut run --max-children 1
	$(BIN)/python tests/mutation/report.py

# The three-node cluster end-to-end cases alone (tests/e2e/test_multinode_embed.py: ray start
# head + two workers, embed/calibrate jobs, node loss, S3 outage, concurrent writers); they are
# also part of `make test`. A few minutes on an idle machine (README "Reliability").
multinode: install
	PATH="$(abspath $(BIN)):$$PATH" RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest tests/e2e/test_multinode_embed.py $(PYTEST_ARGS)
