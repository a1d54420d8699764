# Two commands do everything:  `make demo` (install, train, export, serve, query, report)
# and `make test` (the whole suite). See README.md.
SHELL := /bin/bash
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (never both in one environment).
ORT_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
# The model store: project-local, so the demo and the tests never touch ~/bentoml.
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: install demo test test-deps train train-text serve bench models retrain bento lock clean

$(VENV)/.installed-$(ORT_EXTRA): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON_BIN) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(ORT_EXTRA),train,monitor,postgres,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(ORT_EXTRA)

train: install
	$(PY) -m training

train-text: install
	$(PY) -m training.text --model transformer

serve: install
	$(VENV)/bin/bentoml serve service.service:Classifier --host $(HOST) --port $(PORT)

demo: install
	bash scripts/demo.sh

test: install test-deps
	$(PY) -m pytest tests -q -ra

# Debian's Prometheus and promtool (the real-scrape tests, `promtool check/test rules` on
# deploy/prometheus), PostgreSQL (the shared prediction log: tests/postgres.py starts throwaway
# clusters) and Chromium (the drift report rendered headless). Best effort: without root or apt
# the tests skip and say why.
test-deps:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1; } \
	  || echo "prometheus not installed: tests/integration/test_prometheus.py and test_alerts.py's promtool tests will skip"
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql) >/dev/null 2>&1; } \
	  || echo "postgresql not installed: the PostgreSQL prediction-log tests will skip"
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1; } \
	  || echo "chromium not installed: the browser tests (test_drift_html.py, test_openapi_fuzz.py) will skip"

# The model lifecycle: versions with their metrics and the production marker; a retraining that
# promotes its challenger only if it wins (training/retrain/; RETRAIN_ARGS=--only-if-drifted ...).
MODEL ?= digits-cnn
models: install
	$(PY) -m modelstore list $(MODEL)

retrain: install
	$(PY) -m training.retrain --model $(MODEL) $(RETRAIN_ARGS)

# A Bento (serving code + dependencies, no torch) with the production version of $(MODEL).
bento: install
	$(PY) scripts/build_bento.py --model $(MODEL)

bench: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m tools.bench $(BENCH_ARGS)

# Re-pin every package after changing pyproject.toml's dependencies.
lock:
	$(PIP) freeze --exclude-editable | grep -v '^torch @' > constraints.txt.new
	echo "torch==2.13.0" >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) artifacts .pytest_cache
