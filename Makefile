# Every target bootstraps its own virtualenv: a fresh machine needs only python3 and make.
# Installs are quiet (their log goes to .venv/install.log) and say once what they are doing;
# each target installs only what it needs: the agent plus the demo's endpoint (demo), the
# test tools (test, lint), the benchmark baselines (bench).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOG    := $(VENV)/install.log
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: test test-nspawn lint demo bench install-dev clean install constraints

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip >$(LOG) 2>&1 || { tail -20 $(LOG); exit 1; }

$(VENV)/.installed-%: pyproject.toml constraints.txt | $(BIN)/python
	@echo "make: installing device_agent with its $* tools into $(VENV)/ (first run only, about a minute; log: $(LOG))"
	@$(PIP) install -c constraints.txt -e '.[$*]' >>$(LOG) 2>&1 || { tail -20 $(LOG); exit 1; }
	@touch $@

install-dev: $(VENV)/.installed-test

lint: $(VENV)/.installed-test
	@$(BIN)/ruff check device_agent tests bench vulture_whitelist.py
	@$(BIN)/mypy
	@$(BIN)/vulture
	@$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_layout.py  # the folders' rules

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit under a real systemd (systemd-nspawn; root, systemd-container, mmdebstrap): README.
test-nspawn: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m nspawn tests/systemd $(PYTEST_ARGS)

demo: $(VENV)/.installed-demo
	@$(BIN)/device-agent demo

# awscli v1 (bench_sync.py's baseline) pins botocore exactly: it gets a venv of its own
AWS_VENV := $(VENV)-aws
$(AWS_VENV)/.installed: bench/aws-constraints.txt
	@echo "make: installing awscli into $(AWS_VENV)/ for bench_sync (first run only; log: $(LOG))"
	@$(PYTHON) -m venv $(AWS_VENV)
	@$(AWS_VENV)/bin/python -m pip --disable-pip-version-check install \
		-c bench/aws-constraints.txt awscli >>$(LOG) 2>&1 || { tail -20 $(LOG); exit 1; }
	@touch $@

# the runtime dependencies alone, as systemd/install.sh deploys them: bench_service's RSS rows
RUN_VENV := $(VENV)-run
$(RUN_VENV)/.installed: pyproject.toml constraints.txt
	@echo "make: installing the runtime dependencies alone into $(RUN_VENV)/ for bench_service (first run only; log: $(LOG))"
	@$(PYTHON) -m venv $(RUN_VENV)
	@$(RUN_VENV)/bin/python -m pip --disable-pip-version-check install -c constraints.txt \
		-e . >>$(LOG) 2>&1 || { tail -20 $(LOG); exit 1; }
	@touch $@

bench: $(VENV)/.installed-test $(VENV)/.installed-bench $(AWS_VENV)/.installed $(RUN_VENV)/.installed
	@AWS_CLI=$(abspath $(AWS_VENV))/bin/aws BENCH_DEPLOYED_PYTHON=$(abspath $(RUN_VENV))/bin/python \
		$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(AWS_VENV) $(RUN_VENV) build *.egg-info .pytest_cache .mypy_cache

# On a board, as root: service user, venv under /opt/device-agent, unit, settings (docs/operations.md).
install:
	sh systemd/install.sh

# After a tested upgrade (pip install -U in the test venv, make test green): record the versions.
constraints: $(VENV)/.installed-test
	@{ sed -n '1,2p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt
