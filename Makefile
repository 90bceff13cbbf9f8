# Two commands matter: `make reproduce` and `make test`. Both install first (exact versions from uv.lock).
SHELL := /bin/bash
PY := .venv/bin/python
USER_BIN := $(shell python3 -c 'import site; print(site.getuserbase())')/bin
UV := $(shell command -v uv 2>/dev/null || echo $(USER_BIN)/uv)
PROFILE ?= cpu

.PHONY: setup test reproduce smoke bench lab tensorboard strip clean-venv

setup: .venv/.installed

# uv is bootstrapped with pip when missing; the environment comes from the lock, never re-resolved.
.venv/.installed: pyproject.toml uv.lock
	@test -x "$(UV)" || python3 -m pip install --user --quiet uv \
		|| python3 -m pip install --user --quiet --break-system-packages uv
	"$(UV)" sync --locked --extra dev
	@touch $@

test: setup
	$(PY) -m pytest -q -n auto

reproduce: setup
	$(PY) -m sodlib reproduce --profile $(PROFILE)

smoke: setup
	$(PY) -m sodlib reproduce --profile smoke --out build/smoke  # every step at smoke size, outside results/

bench: setup
	$(PY) -m sodlib bench data

# JupyterLab on the notebooks; adds --allow-root where the user is root (containers, cloud VMs)
lab: setup
	$(PY) -m sodlib.studies.lab notebooks/

# TensorBoard on every run's event files (training writes them beside log.csv)
tensorboard: setup
	$(PY) -m tensorboard.main --logdir results/runs

# run before committing a notebook edited in Jupyter (tests/test_notebooks.py checks it)
strip: setup
	$(PY) -m sodlib.studies.notebooks notebooks/*.ipynb

clean-venv:
	rm -rf .venv
