# Every target bootstraps what it needs: Debian TTS packages (when root), .venv, the package.
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.bootstrapped
PYTEST_ARGS ?=

.PHONY: demo test bench gpu-check clean-venv

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh
	touch $(STAMP)

## make demo: render the default corpus, read it back, train the tiny recipe, evaluate, report
demo: $(STAMP)
	scripts/demo.sh

## make test: the CPU test suite (CUDA tests skip themselves without a GPU)
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## make bench: the recurrent-op benchmark on this machine
bench: $(STAMP)
	$(PY) -m asr.cli bench rnn

## make gpu-check OUT=dir: everything a GPU machine must verify
gpu-check:
	scripts/gpu_check.sh $(or $(OUT),gpu_check_out)

clean-venv:
	rm -rf $(VENV)
