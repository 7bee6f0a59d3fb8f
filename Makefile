# Two entry points (README): `make demo` and `make test`. Each builds the virtual
# environment on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed-stamp

.PHONY: install install-labelstudio demo test test-slow bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# Reference Label Studio brush codec for tests only; its own deps (nltk, ...) are not needed by brush.py.
	$(BIN)/python -m pip install --quiet --no-deps "label-studio-converter==0.0.59"
	# The browser test of `cxr serve` drives Debian's Chromium through Playwright (no browser download).
	# Installed here where apt-get can (CI runs as root); elsewhere that test skips and says why.
	-@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	touch $(STAMP)

# The annotation tools' own importers, for the tests only, in a venv of their own (Datumaro pins
# opencv<5 and pillow 12, which the project's venv does not use): tests/tools.py finds it.
$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet "datumaro==1.13.12"
	touch $(TOOLS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxr demo

# pytest-xdist workers, one test file each at a time so module fixtures are built once:
# on the 2-core CI machine the suite took 485 s in one process and 354 s in two (TensorFlow's eager
# steps and tracing leave a core idle). PYTEST_WORKERS=0 runs it in one process. `loadgroup`, with the
# groups tests/conftest.py gives: a file's tests stay on one worker, and the files that share the
# three-member trained_bundle fixture go to the same one, which trains it once instead of once per
# worker (pytest 492 -> 431 s in a clean clone on the 2-core AMD machine, 2026-11-28; README). Three
# workers ran faster in the checkout (462 against 522 s) but CI slower (682 s against 627 s the landing
# before, with a sixth less test CPU), so two.
PYTEST_WORKERS ?= 2

# The two venvs build side by side (each pip is one process): 161 s and 43 s one after the other in a
# clean clone on the 2-core AMD machine (2026-11-28).
test:
	$(MAKE) --jobs=2 $(STAMP) $(TOOLS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

# Label Studio itself (a Django server, ~70 s to install) for the live round trip in `make test-slow`.
install-labelstudio:
	$(PYTHON) -m venv .venv-labelstudio
	.venv-labelstudio/bin/python -m pip install --quiet "label-studio==1.23.2" "label-studio-sdk==2.1.2"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .venv-labelstudio build dist *.egg-info .pytest_cache .hypothesis
