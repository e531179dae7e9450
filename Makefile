# Two set-up commands: `make demo` (install + train on the built-in default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
KILN := $(VENV)/bin/kiln
# CPU installs pin torch to the local 2.13.0 wheel; GPU machines bring their own torch (>= 2.11).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test venv dev lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .
	$(PY) -c "from kiln.sparsity.kernels import prebuild; prebuild()"  # C++ kernels: build now
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,interop]"
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(KILN) train --config configs/demo.yaml --run.dir runs/demo --run.overwrite true
	$(KILN) generate runs/demo --prompt "ROMEO:" --max-new-tokens 150 --seed 0

test: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest

bench: $(VENV)/.dev
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
