# `make test` and `make demo` work on a fresh clone: they create .venv, install, then run.
# TORCH_SPEC picks the torch version (TORCH_SPEC=torch: the newest); TORCH_INDEX_URL where pip takes it from
# (https://download.pytorch.org/whl/cpu for the CPU wheel; unset: pip's own configuration, PyPI's CUDA build on Linux).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
# a bench script that fails fails `make bench` (`script | tee -a` would otherwise succeed with tee's status)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install test demo bench bench-peers lint docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no tests, which fails this target. The tests run in TEST_WORKERS processes
# (pytest-xdist, a test file's tests in one of them, so its module fixtures are made once; 0 runs them in this
# one), each with one torch thread (much of a test is single-threaded: compiling, tracing, Python): about 8 min
# on 2 cores with a cold inductor cache (14.5 before 2026-12-07; compiled tests on one decoder layer where no path
# loses its two-layer case). The bench scripts take BENCH_THREADS (else 2); the smoke test sets 1.
TEST_WORKERS ?= 2
test: install
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# where `make demo` writes its models, data and adapters (make demo DEMO_DIR=/tmp/demo)
DEMO_DIR ?= build
demo: install
	$(PY) examples/sft_mixlora.py --output-dir $(DEMO_DIR)/demo-mixlora
	$(PY) examples/sft_dynmole.py --output-dir $(DEMO_DIR)/demo-dynmole
	$(PY) examples/multijob.py --output-dir $(DEMO_DIR)/demo-multijob

# The reference implementation in its own virtualenv (MoE-PEFT pins torch < 2.6, transformers < 4.47):
# its MixLoRA/LoRA step ratio, the interop fixture, and MoE-PEFT loading a peft-mole export.
# The reference implementations (torch 2.5.1, transformers 4.46) in their own virtualenv.
PEERS ?= build/peers-venv
bench-peers: install
	test -x $(PEERS)/bin/python || (python3 -m venv $(PEERS) && $(PEERS)/bin/pip install -q "moe-peft==2.0.2" \
		&& $(PEERS)/bin/pip install -q --no-deps "mixlora==0.2.3" "peft==0.13.2")
	$(PEERS)/bin/python bench/peers/moe_peft_step.py | tee -a bench/results/peers-moe-peft-$(shell hostname)-$(shell date +%Y-%m-%d).jsonl
	$(PEERS)/bin/python bench/peers/mixlora_package_step.py | tee -a bench/results/peers-mixlora-$(shell hostname)-$(shell date +%Y-%m-%d).jsonl
	$(PEERS)/bin/python bench/peers/make_moe_peft_fixture.py --out build/moe-peft-fixture
	$(PEERS)/bin/python bench/peers/make_mixlora_fixture.py --out build/mixlora-fixture
	$(PY) bench/peers/check_export.py make build/export-check
	$(PEERS)/bin/python bench/peers/check_export.py check build/export-check

docs: install
	$(VENV)/bin/mkdocs build --strict

RESULTS := bench/results/$(shell hostname)-$(shell date +%Y-%m-%d).jsonl

# Appends JSON lines to bench/results/<machine>-<date>.jsonl, then prints the README table from them.
bench: install
	mkdir -p bench/results
	$(PY) bench/mixlora_vs_lora.py --dropout 0.05 | tee -a $(RESULTS)
	$(PY) bench/mixlora_vs_lora.py --dropout 0.0 | tee -a $(RESULTS)
	$(PY) bench/multijob_speedup.py --dropout 0.0 | tee -a $(RESULTS)
	$(PY) bench/dynmole_vs_mixlora.py | tee -a $(RESULTS)
	$(PY) bench/saved_activations.py | tee -a $(RESULTS)
	$(PY) bench/generate_vs_base.py --compile | tee -a $(RESULTS)
	$(PY) bench/multijob_speedup.py | tee -a $(RESULTS)
	$(PY) bench/multijob_vs_sfttrainer.py | tee -a $(RESULTS)
	$(PY) bench/multijob_memory.py | tee -a $(RESULTS)
	$(PY) bench/memory_model_error.py | tee -a $(RESULTS)
	$(PY) bench/memory_model_error.py --kinds lora mixlora dynmole | tee -a $(RESULTS)
	$(PY) bench/pad_fraction.py | tee -a $(RESULTS)
	$(PY) bench/packed_attention.py | tee -a $(RESULTS)
	$(PY) bench/eval_throughput.py | tee -a $(RESULTS)
	$(PY) bench/compile_step.py | tee -a $(RESULTS)
	$(PY) bench/compile_step.py --impls peft_lora mixlora --gradient-checkpointing | tee -a $(RESULTS)
	$(PY) bench/grouped_products.py | tee -a $(RESULTS)
	$(PY) bench/host_time.py | tee -a $(RESULTS)
	$(PY) bench/job_optimizer.py | tee -a $(RESULTS)
	$(PY) bench/options_step.py | tee -a $(RESULTS)
	$(PY) bench/options_step.py --options fp16_autocast --repeats 10 | tee -a $(RESULTS)
	$(PY) bench/mole_vs_reference.py --peers-python $(PEERS)/bin/python | tee -a $(RESULTS)
	$(PY) bench/render_table.py $(RESULTS)

lint: install
	$(VENV)/bin/ruff check peft_mole tests examples bench

clean:
	rm -rf build .pytest_cache
