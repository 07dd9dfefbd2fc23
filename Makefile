# Two commands: `make demo` and `make test`. Everything they need is installed from here.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed

.PHONY: test demo lint bench dist clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# The demo needs only the `demo` extra (moto's S3 and flask): about a quarter of the test environment, which
# adds pytest, mypy and a browser driver. After `make test` the environment has it all already.
$(DEMO_STAMP): pyproject.toml
	@if [ $(STAMP) -nt pyproject.toml ]; then touch $@; else \
		$(PY) -m venv $(VENV) && \
		$(BIN)/pip install -q --disable-pip-version-check -e '.[demo]' && touch $@; fi

lint: $(STAMP)
	$(BIN)/ruff check cachingproxy tests benchmarks
	$(BIN)/mypy cachingproxy
	$(BIN)/lint-imports

# install-browser.sh is instant once chromium is there and never fails; without chromium the browser suites
# are skipped, and -rs prints why in the summary.
test: lint
	.ci/install-browser.sh
	$(BIN)/pytest -q -rs -p no:cacheprovider

# `make demo DEMO_ARGS="--port 9090"` for another port.
demo: $(DEMO_STAMP)
	$(BIN)/python -m cachingproxy.demo $(DEMO_ARGS)

# The proxy beside nginx proxy_cache and a direct fetch (issue 6): installs nginx and wrk from the system
# packages when missing (benchmarks/setup.sh), runs for about 3 minutes on loopback only, prints one table
# and writes it to benchmarks/results/latest.md.
bench: $(STAMP)
	sh benchmarks/setup.sh
	$(BIN)/python benchmarks/run.py --no-setup

# The wheel to install on a server (README, "Install on a server"): dist/cachingproxy-<version>-py3-none-any.whl.
DIST ?= dist
dist: $(STAMP)
	$(BIN)/python -m build --wheel --no-isolation --outdir $(DIST) .

clean:
	rm -rf $(VENV) demo-cache test-output build dist
