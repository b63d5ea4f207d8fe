# Two commands: `make demo` and `make test`. Each bootstraps .venv from nothing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench venv clean

venv: $(STAMP)

# torch is installed first and pinned to the CPU wheel so that nothing pulls a multi-GB CUDA build;
# pyproject.toml only asks for torch>=2.4, which GPU images satisfy with their own build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo

# Everything (what CI runs): ~22-34 minutes on 2 idle cores, by the box (fresh clones, `make venv` then
# `.venv/bin/python -m pytest -q tests -p no:cacheprovider`: 2026-12-07, AMD Zen 5, 22.3 min of tests, 553 passed;
# 2026-12-06, 28.7 and 33.5 min; + ~1 min of set-up); 45-55 minutes when other jobs share the cores or the machine
# runs slow (52 min one morning, when benchmarks/startup.py --first-chunk ran 1.86x slower).
test: $(STAMP)
	$(PY) -m pytest -q tests

# The edit-test loop: no test marked slow (no Ray Train fit, no Prefect server, no cluster), under 5 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/lmdb_decode.py
	$(PY) benchmarks/shard_codec.py
	$(PY) benchmarks/face_detect.py
	$(PY) benchmarks/dedup_quality.py
	$(PY) benchmarks/dedup_grouping.py
	$(PY) benchmarks/dedup_report.py
	$(PY) benchmarks/svm_features.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/sample_quality.py

clean:
	rm -rf $(VENV) runs .pytest_cache
