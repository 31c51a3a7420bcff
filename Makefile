# The whole pipeline of the paper on the embedded world, plus tests and benchmarks.
#   make test        the test suite (CPU, a few minutes)
#   make demo        CoMT-SFT -> CCRL -> evaluation from the shipped base model (CPU, ~15 minutes)
#   make base        rebuild the shipped base model (one H100: 4.5 minutes; 2 CPU cores: ~95 minutes, resumable)
#   make base-skills measure base/: base problems, arithmetic, executing given plans (base vs task families)
#   make reproduce   the paper's table: 5 methods x 3 seeds on the embedded world
#   make bench       our model vs HF transformers, same run
#   make bench-gpu   on a CUDA machine (no install step): the attention kernel check + the GPU benchmark
#                    (= make bench-gpu-attention, then make bench-gpu-model)

PY ?= python
SEEDS ?= 0 1 2
SETS = data/world/test_id.jsonl data/world/ood_hard.jsonl data/world/ood_deep.jsonl \
       data/world/ood_novel.jsonl data/world/ood_table.jsonl data/world/ood_symbolic.jsonl

# The base stage: corpus size, tokenizer size and training budget (see README, "The base model").
BASE_DOCS ?= 30000
BASE_VOCAB ?= 960
BASE_FLAGS ?= --max-steps 3500 --batch-size 32 --lr 2e-3 --warmup-steps 100 --save-every 250 --eval-frac 0.005 \
              --eval-every 1000 --eval-problems data/pretrain_test.jsonl --eval-problems-n 100 --log-every 25
# The demo's budgets: sized for 2 CPU cores. SFT replays base-corpus documents as half of its examples
# (rehearsal; without it CoMT-SFT erodes the base's execution: README, "Results").
DEMO_SFT ?= --max-steps 150 --batch-size 32 --lr 1e-3 --warmup-steps 10 --eval-every 0 --log-every 10 \
            --replay data/pretrain.jsonl --replay-frac 0.5
DEMO_PPO ?= --steps 20 --prompts-per-step 32 --minibatch-size 16 --max-new-tokens 320 --lr 3e-5 --temperature 0.5 \
            --eval-every 0 --eval-problems "" --log-every 1 --sample-every 10
DEMO_EVAL ?= --limit 100 --max-new-tokens 512
# reproduce: the same budgets for every method.
REPRO_SFT ?= $(DEMO_SFT)
REPRO_PPO ?= $(DEMO_PPO)
REPRO_EVAL ?= --limit 100 --max-new-tokens 512

.PHONY: install install-run test data base base-skills base-resume demo reproduce bench bench-gpu bench-gpu-attention bench-gpu-model

install:
	$(PY) -m pip install -q -r requirements-dev.txt

# What the scripts themselves import (the demo and the paper's table need no test references).
install-run:
	$(PY) -m pip install -q -r requirements.txt

test: install
	$(PY) -m pytest -q tests

data:
	$(PY) data.py --n-pretrain $(BASE_DOCS)

# The base skills: held-out base problems, task problems before SFT, bare arithmetic (out/base), and the
# execution of a given gold plan, base families vs task families (out/base_plan): CoMT needs the latter.
define base_skills
	$(PY) eval.py --ckpt base --sets data/pretrain_test.jsonl data/world/test_id.jsonl --arithmetic 50 \
	    --limit 200 --out out/base
	$(PY) eval.py --ckpt base --names base+plan --given-plan --sets data/pretrain_test.jsonl data/world/test_id.jsonl \
	    --limit 200 --out out/base_plan
endef

base-skills:
	$(base_skills)

base: data
	$(PY) tokenizer.py train --data data/pretrain.jsonl --vocab-size $(BASE_VOCAB) --out data/tokenizer
	$(PY) sft.py --data data/pretrain.jsonl --init scratch --tokenizer data/tokenizer --model embedded \
	    --out base --overwrite $(BASE_FLAGS)
	$(base_skills)

# Continue an interrupted base run exactly (e.g. the CPU run, a few hundred steps per sitting).
base-resume: data
	$(PY) tokenizer.py train --data data/pretrain.jsonl --vocab-size $(BASE_VOCAB) --out data/tokenizer
	$(PY) sft.py --data data/pretrain.jsonl --init scratch --tokenizer data/tokenizer --model embedded \
	    --out base --resume $(BASE_FLAGS)

demo: install-run data
	@test -f base/config.json || { echo "error: base/ not found: run 'make base' first (see README)"; exit 2; }
	$(PY) sft.py --data data/comt.jsonl --init base --out ckpt/comt --overwrite $(DEMO_SFT)
	$(PY) ppo.py --init ckpt/comt --out ckpt/comt_ccrl --overwrite --reward ccrl $(DEMO_PPO)
	$(PY) eval.py --ckpt ckpt/comt ckpt/comt_ccrl --sets $(SETS) --out out/demo $(DEMO_EVAL)
	@echo "report: out/demo/report.html"

reproduce: install-run data
	@test -f base/config.json || { echo "error: base/ not found: run 'make base' first (see README)"; exit 2; }
	for s in $(SEEDS); do \
	  $(PY) sft.py --data data/cot.jsonl  --init base --out ckpt/r/cot_s$$s  --overwrite --seed $$s $(REPRO_SFT) && \
	  $(PY) sft.py --data data/comt.jsonl --init base --out ckpt/r/comt_s$$s --overwrite --seed $$s $(REPRO_SFT) && \
	  $(PY) ppo.py --init ckpt/r/cot_s$$s  --out ckpt/r/cot_ppo_s$$s   --overwrite --seed $$s --reward outcome $(REPRO_PPO) && \
	  $(PY) ppo.py --init ckpt/r/comt_s$$s --out ckpt/r/comt_ppo_s$$s  --overwrite --seed $$s --reward outcome $(REPRO_PPO) && \
	  $(PY) ppo.py --init ckpt/r/comt_s$$s --out ckpt/r/comt_ccrl_s$$s --overwrite --seed $$s --reward ccrl $(REPRO_PPO) \
	  || exit 1; \
	done
	$(PY) eval.py --ckpt $(foreach s,$(SEEDS),ckpt/r/cot_s$(s) ckpt/r/cot_ppo_s$(s) ckpt/r/comt_s$(s) ckpt/r/comt_ppo_s$(s) ckpt/r/comt_ccrl_s$(s)) \
	    --sets $(SETS) --out out/reproduce --group-seeds $(REPRO_EVAL)

bench: install
	$(PY) bench.py

# Writes its tables and logs to $(BENCH_OUT) as it goes (bench.md after every section, so a run cut short by a time
# limit keeps what it measured); exits 1 if a correctness check fails (see docs/PERFORMANCE.md). Two halves, also
# runnable one at a time (each under 10 minutes, for a machine lent by the call): bench-gpu-attention, the
# attention kernel's sweep over 102 tile candidates, checks and timings (~3-4 min on one H100: mostly Triton
# compiles); bench-gpu-model, bench.py's sections, training first, inside BENCH_SECONDS.
BENCH_OUT ?= out/bench
BENCH_SECONDS ?= 400
# the attention sweep's winners, kept outside BENCH_OUT (a lent machine's output folder is new at every call,
# its working tree is not) so that bench-gpu-model, run next, uses the tiles bench-gpu-attention chose
ATTN_TILES ?= out/attention_tiles.json
bench-gpu:
	$(MAKE) bench-gpu-attention; a=$$?; $(MAKE) bench-gpu-model; b=$$?; test $$a = 0 && test $$b = 0

bench-gpu-attention:
	mkdir -p $(BENCH_OUT) $(dir $(ATTN_TILES))
	PYTHONUNBUFFERED=1 $(PY) bench_attention.py --save-tiles $(ATTN_TILES) > $(BENCH_OUT)/attention.txt 2>&1; a=$$?; \
	    cat $(BENCH_OUT)/attention.txt; cp -f $(ATTN_TILES) $(BENCH_OUT)/ 2>/dev/null; test $$a = 0

bench-gpu-model:
	mkdir -p $(BENCH_OUT)
	PYTHONUNBUFFERED=1 $(PY) bench.py --device cuda --sections 1,2,4,3 --time-budget $(BENCH_SECONDS) --out $(BENCH_OUT)/bench.md \
	    --profile $(BENCH_OUT)/profile.txt --attention-tiles $(ATTN_TILES) > $(BENCH_OUT)/bench.log 2>&1; b=$$?; \
	    tail -n 120 $(BENCH_OUT)/bench.log; test $$b = 0
