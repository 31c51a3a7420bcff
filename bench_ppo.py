"""
PPO updates per second: our ppo.py against TRL 1.12's experimental PPOTrainer (the last TRL release
that ships PPO), on the same random policy, the same prompts, batch and response length, timed in one
run on the CPU. Prints a markdown table: updates/s, seconds per update, the ratio ours / TRL, and the
exact settings. A development benchmark: TRL is a dev-only dependency, never imported by the project.

    python -m venv --system-site-packages .venv-trl
    .venv-trl/bin/pip install trl==1.12.0    # must keep the installed torch; else --no-deps + accelerate datasets
    .venv-trl/bin/python bench_ppo.py                     # tiny policy (d=64, 2 layers), 5 timed updates
    .venv-trl/bin/python bench_ppo.py --model small --also-head   # d=256, 4 layers; + ours --critic head

What is shared. One temporary directory holds one checkpoint, written by our model.py with
`save_pretrained` (HF Llama layout) next to an HF `tokenizer.json` (a byte-level BPE trained here with
`tokenizers` on seeded random text; any text does, only the vocabulary size matters). Our
ppo.py loads both with `Transformer.from_pretrained` / `Tokenizer.load`; TRL loads the very same files
with `AutoModelForCausalLM` (policy and reference), `AutoModelForSequenceClassification` (value model)
and `AutoTokenizer`. The prompts are the same token ids for both (BOS + "Question: ...\\n", all of one
length, so no padding); each update samples `prompts` responses of exactly `response_len` tokens: the
EOS id sits one past the model's vocabulary, so neither sampler can emit it and nobody stops early
(TRL also gets stop_token=None). Both do GAE (gamma 1, lambda 0.95), k1 KL in the reward (coef 0.05),
clipped policy and value losses, `ppo_epochs` passes of `prompts / minibatch` minibatches, in fp32.

How it is timed. Both run `warmup + updates` updates in this process with the same torch thread count;
the clock marks the end of every update (our `ppo_step` returning; TRL's `on_step_end` callback), and
seconds per update is the median interval over the last `updates` (updates/s and the ratio use it;
the mean and min are printed beside it), so model loading, tokenizer, dataset and trainer
construction and our final checkpoint save are all outside it. Loop overhead inside an
update is counted for both (TRL's gc.collect and metric logging; our metrics line). Beside wall time
it reports CPU time per update (time.process_time, all threads of this process): on a machine where
other jobs compete for the cores, wall time depends on when each run got the CPU, and CPU time is
the steadier measure of the work done; on an idle machine with 1 thread the two agree.

Caveats (the two workloads are the same shape, not the same program):
* Critic. TRL's value model is a full second transformer; ours runs with --critic separate (its own
  copy of the trunk) to match. Our default --critic head (a value head on the policy's trunk) is
  cheaper still; `--also-head` adds a row for it.
* Reward. TRL scores responses with a reward model (one more no-grad forward per update); here it is a
  tiny random 1-layer, d=32 sequence classifier, so that forward costs TRL almost nothing. Ours uses
  its rule-based outcome reward (decode, parse the answer; every response lacks EOS, so every score is
  the missing-EOS penalty, a constant). Throughput is measured, not learning.
* Sampling. TRL samples with HF `generate` (dynamic KV cache); ours with its static-cache sampler.
  TRL takes every PAD id in a response as padding, so a randomly sampled PAD (about 1 token in
  `vocab`) masks the rest of that response in its losses; the computation is the same size.
* Small differences in the update: ours clips the gradient norm (TRL's PPO loop does not) and keeps
  separate learning rates for policy and critic (set equal here); TRL keeps a linear LR schedule.
* CPU timings on a shared machine are noisy; compare the ratio from one run, not numbers across runs.
"""
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

INSTALL = ("python -m venv --system-site-packages .venv-trl && .venv-trl/bin/pip install trl==1.12.0, "
           "then run bench_ppo.py with .venv-trl/bin/python")

MODELS = {  # policy shapes (vocab_size comes from the tokenizer)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
    "embedded": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=6,
                     num_key_value_heads=2),
}


@dataclass
class BenchConfig:
    model: str = "tiny"  # policy shape: tiny | small | embedded (MODELS above)
    vocab: int = 512  # BPE vocabulary size asked of the trainer (model rows = what it gives)
    prompts: int = 16  # prompts (= responses) per PPO update
    response_len: int = 32  # sampled tokens per response, always all of them (no EOS possible)
    ppo_epochs: int = 4  # passes over each rollout batch (TRL's default)
    minibatch: int = 16  # sequences per gradient step (16 = the whole batch, TRL's num_mini_batches=1)
    updates: int = 5  # timed updates
    warmup: int = 1  # untimed updates before them
    threads: int = 1  # torch threads for both
    lr: float = 1e-5  # policy (and critic) learning rate for both
    seed: int = 0
    also_head: bool = False  # also time ours with --critic head (value head on the policy trunk)


# ----------------------------------------------------------------------------- shared inputs

QUESTION = ("A farm has {a} animals. {b} out of every 100 animals are sheep and the rest are goats. "
            "Each goat eats 2 kg of hay a day. How many kg of hay do the goats eat each day?")


def corpus(seed: int) -> list[str]:
    """Tokenizer-training text, a pure function of the seed: random letter words and numbers, plus the
    question's own words, so the vocabulary is full and the prompts are of a realistic length."""
    import random
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) + f" {rng.randint(0, 9999)}." for _ in range(3000)]
    return lines + [QUESTION.format(a=rng.randint(10, 999), b=rng.randint(10, 99)) for _ in range(300)]


def build_checkpoint(cfg: BenchConfig, d: Path):
    """Tokenizer + random policy in d (both frameworks load it), a tiny reward model in d/rm, and a
    problems file whose prompts all have one token length. Returns (prompt ids, prompt length)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from model import ModelConfig, Transformer
    from tokenizer import Tokenizer

    texts = corpus(cfg.seed)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=cfg.vocab, special_tokens=["<|bos|>", "<|pad|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n_model = hf.get_vocab_size()
    hf.add_special_tokens(["<|eos|>"])  # id n_model: past the model's rows, so it is never sampled
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", padding_side="left")
    fast.save_pretrained(d)
    tok = Tokenizer.load(d / "tokenizer.json")
    assert tok.eos_id == n_model and tok.stop_ids == {n_model}, (tok.eos_id, tok.stop_ids, n_model)

    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig(vocab_size=n_model, max_position_embeddings=512, bos_token_id=tok.bos_id,
                       pad_token_id=tok.pad_id, **MODELS[cfg.model])
    policy = Transformer(mcfg)
    policy.save_pretrained(d, dtype=torch.float32)
    n_params = policy.num_params()

    rm_cfg = LlamaConfig(vocab_size=n_model, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_id, num_labels=1)
    LlamaForSequenceClassification(rm_cfg).save_pretrained(d / "rm")

    # Prompts of one token length: try sums, keep those of the most common length.
    from data import prompt_text
    cands = []
    for a in range(11, 99, 3):
        for b in range(12, 99, 7):
            q = QUESTION.format(a=a, b=b)
            cands.append((q, a + b, tok.render(prompt_text(q))[0]))
    lengths = [len(c[2]) for c in cands]
    P = max(set(lengths), key=lengths.count)
    keep = [c for c in cands if len(c[2]) == P][:max(64, cfg.prompts)]
    if len(keep) < cfg.prompts:
        raise SystemExit(f"error: only {len(keep)} prompts of length {P}; lower --prompts")
    with open(d / "problems.jsonl", "w") as f:
        for i, (q, ans, _) in enumerate(keep):
            f.write(json.dumps({"id": f"b{i}", "question": q, "answer": str(ans), "intermediates": []}) + "\n")
    return [c[2] for c in keep], P, n_model, n_params


def intervals(marks):
    """Per-update wall seconds and CPU seconds (this process, all threads) from (wall, cpu) marks."""
    return dict(intervals=[b[0] - a[0] for a, b in zip(marks, marks[1:])],
                cpu=[b[1] - a[1] for a, b in zip(marks, marks[1:])])


# ----------------------------------------------------------------------------- ours


def run_ours(cfg: BenchConfig, d: Path, critic: str) -> dict:
    import ppo
    pcfg = ppo.PPOConfig(
        init=str(d), problems=str(d / "problems.jsonl"), eval_problems="", out=str(d / f"ours_{critic}"),
        overwrite=True, reward="outcome", kl_coef=0.05, prompts_per_step=cfg.prompts, samples_per_prompt=1,
        max_new_tokens=cfg.response_len, temperature=1.0, advantage="gae", gamma=1.0, lam=0.95,
        clip=0.2, value_clip=0.2, vf_coef=0.1, critic=critic, steps=cfg.warmup + cfg.updates,
        ppo_epochs=cfg.ppo_epochs, minibatch_size=cfg.minibatch, lr=cfg.lr, critic_lr=cfg.lr,
        log_every=10 ** 9, sample_every=0, eval_every=0, save_every=0, seed=cfg.seed, device="cpu",
        dtype="float32", attn="sdpa")
    marks, inner = [], ppo.ppo_step

    def clocked(step, c, ctx):  # timing only: marks when each update starts and ends
        if not marks:
            marks.append((time.perf_counter(), time.process_time()))
        row = inner(step, c, ctx)
        marks.append((time.perf_counter(), time.process_time()))
        return row

    ppo.ppo_step = clocked
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ppo.train(pcfg)
    finally:
        ppo.ppo_step = inner
    rows = [json.loads(l) for l in (d / f"ours_{critic}" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[cfg.warmup:]
    return dict(**intervals(marks),
                rollout_s=statistics.mean(r["rollout_s"] for r in timed),
                update_s=statistics.mean(r["update_s"] for r in timed),
                response_len=statistics.mean(r["response_len"] for r in rows), eos=sum(r["eos_frac"] for r in rows),
                minibatches=rows[-1]["minibatches"])


# ----------------------------------------------------------------------------- TRL


def run_trl(cfg: BenchConfig, d: Path, prompts: list) -> dict:
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              PrinterCallback, ProgressCallback, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.logs = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    tok = AutoTokenizer.from_pretrained(d)
    f32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(d, **f32)
    ref = AutoModelForCausalLM.from_pretrained(d, **f32)
    value = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(d / "rm", num_labels=1, **f32)
    data = Dataset.from_dict({"input_ids": prompts})
    n = cfg.warmup + cfg.updates
    args = PPOConfig(
        output_dir=str(d / "trl"), use_cpu=True, bf16=False, fp16=False, report_to="none", seed=cfg.seed,
        per_device_train_batch_size=cfg.prompts, gradient_accumulation_steps=1,
        num_mini_batches=cfg.prompts // cfg.minibatch, local_rollout_forward_batch_size=cfg.prompts,
        total_episodes=n * cfg.prompts, num_ppo_epochs=cfg.ppo_epochs, response_length=cfg.response_len,
        stop_token=None, temperature=1.0, missing_eos_penalty=None, kl_coef=0.05, kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
        learning_rate=cfg.lr, num_sample_generations=0, save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    clock = Clock()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=data, eval_dataset=data, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    torch.set_num_threads(cfg.threads)  # in case anything above changed it
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    lens = [l.get("val/num_eos_tokens") for l in clock.logs]
    return dict(**intervals(clock.marks), eos=sum(x or 0 for x in lens),
                updates_run=len(clock.marks) - 1, threads_after=torch.get_num_threads())


# ----------------------------------------------------------------------------- report


def main(argv=None):
    from sft import parse_config
    cfg = parse_config(BenchConfig, __doc__, argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        import trl.experimental.ppo  # noqa: F401
    except ImportError as e:
        print(f"error: TRL's PPOTrainer is not importable ({e}); install it: {INSTALL}", file=sys.stderr)
        sys.exit(2)
    if cfg.model not in MODELS or cfg.prompts % cfg.minibatch or min(cfg.prompts, cfg.response_len, cfg.updates) < 1:
        print(f"error: --model one of {sorted(MODELS)}, --prompts a multiple of --minibatch, positive sizes "
              f"expected; got {asdict(cfg)}", file=sys.stderr)
        sys.exit(2)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # TrainingArguments' renamed fields
    warnings.filterwarnings("ignore", message=".*degrees of freedom")  # TRL's ratio variance over 1 value
    torch.set_num_threads(cfg.threads)

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        d = Path(tmp)
        prompts, P, V, n_params = build_checkpoint(cfg, d)
        results = {}
        results["ours"] = run_ours(cfg, d, "separate")
        if cfg.also_head:
            results["ours_head"] = run_ours(cfg, d, "head")
        results["trl"] = run_trl(cfg, d, prompts)

    def timed(r, key="intervals"):
        return r[key][cfg.warmup:]
    trl_s, trl_cpu = statistics.median(timed(results["trl"])), statistics.median(timed(results["trl"], "cpu"))
    names = {"ours": "ours (ppo.py, --critic separate)", "ours_head": "ours (ppo.py, --critic head)",
             "trl": f"TRL {trl.__version__} experimental PPOTrainer"}
    print(f"\n## PPO updates per second, CPU, {cfg.threads} thread(s), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}\n")
    print("| implementation | updates/s (wall) | s / update: median | mean | min | ratio vs TRL (wall) "
          "| CPU s / update (median) | ratio vs TRL (CPU time) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        s, c = statistics.median(timed(r)), statistics.median(timed(r, "cpu"))
        print(f"| {names[k]} | {1 / s:.3f} | {s:.3f} | {statistics.mean(timed(r)):.3f} | {min(timed(r)):.3f} "
              f"| {trl_s / s:.2f}x | {c:.3f} | {trl_cpu / c:.2f}x |")
    o = results["ours"]
    print(f"\nSettings: policy '{cfg.model}' {MODELS[cfg.model]} vocab {V} ({n_params / 1e6:.2f}M params, fp32, "
          f"random init, one checkpoint for both); {cfg.prompts} prompts x {P} tokens (BOS included, no padding) "
          f"per update; {cfg.response_len} sampled tokens per response, temperature 1, no early stop "
          f"(EOS seen: ours {o['eos']:.0f}, TRL {results['trl']['eos']}); {cfg.ppo_epochs} PPO epochs x "
          f"{cfg.prompts // cfg.minibatch} minibatch(es) of {cfg.minibatch}; GAE gamma 1 lambda 0.95; k1 KL coef 0.05; "
          f"clip 0.2, value clip 0.2, vf_coef 0.1; AdamW lr {cfg.lr}; {cfg.warmup} warm-up + {cfg.updates} timed "
          f"updates each; mean ours response length {o['response_len']:.1f}; TRL ran {results['trl']['updates_run']} "
          f"updates, threads after its setup {results['trl']['threads_after']}.")
    print(f"Ours split per timed update: rollout (sampling) {o['rollout_s']:.3f}s, scoring + PPO epochs "
          f"{o['update_s']:.3f}s.")
    for key, what in (("intervals", "wall"), ("cpu", "CPU")):
        print(f"Per-update {what} seconds: " + "; ".join(
            f"{k}: " + ", ".join(f"{x:.3f}" for x in r[key]) for k, r in results.items()) + " (first = warm-up)")
    print("Caveats: TRL's critic is a second full transformer, matched by ours --critic separate; TRL also runs "
          "a (tiny, 1-layer d=32) reward-model forward per update while ours computes a rule-based outcome "
          "reward; TRL samples with HF generate, ours with its static-KV-cache sampler; ours clips grad norm, "
          "TRL does not. See the module docstring.")


if __name__ == "__main__":
    main()
