# Two commands set everything up: `make demo` and `make test`.
# torch is pinned through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
# curvlinops is the K-FAC reference of the tests; installed without its declared dependency
# backpack-for-pytorch, which would pull torchvision and a CUDA build of a newer torch.
CURVLINOPS_DEPS := einconv einops linear_operator numpy opt-einsum scipy tqdm

.PHONY: install demo test bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,bench]"
	$(PIP) $(CURVLINOPS_DEPS)
	$(PIP) --no-deps curvlinops-for-pytorch==3.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# the suite on TEST_WORKERS processes (pytest-xdist), a test file to each at a time, so that the tests of one
# file run in their order in one process as without workers; TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --full
	$(BIN)/python -m benchmarks.targets
	$(BIN)/python -m benchmarks.compile_time
	$(BIN)/python -m benchmarks.profile
	$(BIN)/python -m benchmarks.overhead

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info
