"""
Supervised fine-tuning: the base stage, CoT-SFT and CoMT-SFT (paper §3.1) are the same loop on
different data.

    python sft.py --data data/comt.jsonl --out ckpt/comt              # CoMT-SFT from the shipped base/
    python sft.py --data data/cot.jsonl --out ckpt/cot                # the CoT-SFT baseline
    python sft.py --data data/comt.jsonl --replay data/pretrain.jsonl # half the examples: base documents (the demo)
    python sft.py --data data/pretrain.jsonl --init scratch --tokenizer data/tokenizer --out base --overwrite
                                                                      # the base stage (make base: all its flags)
    python sft.py --data data/comt.jsonl --out ckpt/comt --resume     # continue a killed run exactly
    torchrun --standalone --nproc_per_node=8 sft.py --init MODEL_DIR --data comt.jsonl --fsdp   # many GPUs

Data lines (jsonl), one of:
  {"prompt", "completion"[, "eos": false]}  loss on the completion (and its EOS unless eos is false)
  {"text"}                                  loss on every token
  {"messages": [{"role", "content"}, ...]}  loss on the assistant turns
CoMT-SFT maximises log p(meta_thought | question), i.e. L = -sum_t log p(s_t | q, s_<t) over the
meta-thought tokens only (paper §3.1); CoT-SFT is the same objective on full worked solutions.
"""

import argparse
import io
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from cross_entropy import chunked_cross_entropy
from model import (CONFIGS, CheckpointError, ModelConfig, Transformer, check_out_dir, fuse_optimizer_state,
                   resolve_device)


@dataclass
class SFTConfig:
    data: str = "data/comt.jsonl"  # training pairs (jsonl: prompt/completion, text or messages)
    eval_data: str = ""  # held-out pairs for the eval loss; "" = hold out eval_frac of data
    eval_frac: float = 0.02  # share of data held out when eval_data is empty
    eval_problems: str = ""  # problems file for greedy answer accuracy at each eval ("" = skip)
    eval_problems_n: int = 200  # how many of those problems to decode
    replay: str = ""  # a second jsonl mixed into the training examples (rehearsal, e.g. the base corpus); "" = none
    replay_frac: float = 0.5  # share of the training examples drawn from replay (when replay is set)
    init: str = "auto"  # checkpoint dir to start from; "scratch" = random init; "auto" = base/ or scratch
    model: str = "embedded"  # named config (model.CONFIGS) when training from scratch
    tokenizer: str = ""  # tokenizer dir when training from scratch ("" = the init checkpoint's)
    out: str = "ckpt/sft"  # checkpoint directory written (atomically) every save_every steps and at the end
    overwrite: bool = False  # allow replacing an existing checkpoint in out without --resume
    resume: bool = False  # continue from the checkpoint in out: weights, optimizer, step, RNG, data position
    stop_at: int = 0  # save and stop after this step (0 = run to the end); split a long run, then --resume
    max_len: int = 512  # tokens per example; longer ones are truncated and counted
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the data (max_steps wins if set)
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    lr: float = 1e-3  # peak learning rate (from scratch); use ~1e-5 for multi-billion checkpoints
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 50  # linear warmup
    weight_decay: float = 0.1  # AdamW decay, on >= 2-D weights only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    eval_every: int = 200  # steps between evaluations (0 = only at the end)
    save_every: int = 200  # steps between checkpoints (0 = only at the end)
    log_every: int = 10  # steps between log lines
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model (CUDA)
    attn: str = "sdpa"  # attention backend: sdpa | math | triton
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP


class DataError(ValueError):
    """Bad training input; the message is one line naming file, line and what was expected."""


def check_config(cfg: SFTConfig):
    """Every flag's range, before anything is read or written."""
    def bad(name, expected):
        raise DataError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected {expected}")
    for name in ("batch_size", "grad_accum", "max_len", "log_every", "eval_problems_n"):
        if getattr(cfg, name) < 1:
            bad(name, "a positive integer")
    for name in ("max_steps", "stop_at", "warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            bad(name, "a number >= 0")
    for name in ("lr", "epochs"):
        if not getattr(cfg, name) > 0:
            bad(name, "a positive number")
    if not 0 <= cfg.min_lr_frac <= 1:
        bad("min_lr_frac", "a number in [0, 1]")
    for name in ("eval_frac", "beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad(name, "a number in [0, 1)")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad("dtype", "auto, float32 or bfloat16")


# -----------------------------------------------------------------------------------------------
# Data: jsonl lines -> (ids, loss mask), then length-bucketed batches


PAIR_KEYS = {"prompt", "completion"}
META_KEYS = {"id", "source", "answer", "eos"}  # tolerated alongside the payload


def read_examples(path: str) -> list[tuple[int, dict]]:
    """(line number, object) of every line; data.py owns the jsonl reading."""
    from data import read_jsonl
    rows = read_jsonl(path)
    for n, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def encode_example(tok, obj: dict, where: str):
    """One data line -> (ids, mask) with mask 1 on the tokens the loss is taken on."""
    keys = set(obj) - META_KEYS
    if keys == PAIR_KEYS:
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings and the completion non-empty")
        return tok.render(prompt, completion, eos=obj.get("eos", True) is not False)
    if keys == {"text"}:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        ids = tok.encode(obj["text"], bos=tok.bos_id is not None, eos=True)
        return ids, [0 if (i == 0 and tok.bos_id is not None) else 1 for i in range(len(ids))]
    if keys == {"messages"}:
        if not isinstance(obj["messages"], list) or not obj["messages"]:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        return tok.render_messages(obj["messages"])
    raise DataError(f"{where}: fields {sorted(obj)} are not a known format: expected prompt+completion, "
                    f"text, or messages (optional: {sorted(META_KEYS)})")


def load_examples(path: str, tok, max_len: int, rows=None):
    """Encode the lines of path (or the given subset of its (line, object) rows), truncated to max_len."""
    examples, truncated = [], 0
    for n, obj in read_examples(path) if rows is None else rows:
        ids, mask = encode_example(tok, obj, f"{path}:{n}")
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            truncated += 1
        if sum(mask[1:]) == 0:  # nothing left to learn after truncation
            raise DataError(f"{path}:{n}: no loss tokens within max_len={max_len}")
        examples.append((ids, mask))
    return examples, truncated


def replay_examples(cfg: SFTConfig, tok, n_train: int):
    """Rehearsal: a fixed random subset of the replay file (a pure function of the seed, so resume sees
    the same one), sized so it is replay_frac of the mixed training set. Fine-tuning a small model on
    one narrow format erodes skills the format does not exercise; mixing some of the pretraining
    distribution back in is the usual remedy (InstructGPT's PPO-ptx does it in RL)."""
    if not 0 < cfg.replay_frac < 1:
        raise DataError(f"--replay-frac {cfg.replay_frac}: expected a share strictly between 0 and 1")
    rows = read_examples(cfg.replay)
    n = min(len(rows), round(n_train * cfg.replay_frac / (1 - cfg.replay_frac)))
    picked = [rows[i] for i in sorted(random.Random(cfg.seed).sample(range(len(rows)), n))]
    return load_examples(cfg.replay, tok, cfg.max_len, picked)[0]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A deterministic function of (seed, epoch): shuffle, sort chunks of 64 batches by length so a
    batch holds similar lengths (little padding), then shuffle the batch order. Resume recomputes it."""
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 64
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, idx, pad_id: int, device):
    """Right padding: causal attention never lets a real token see a pad, so no mask is needed and
    positions are 0..len-1 as in the unpadded example. Targets are the next tokens; -100 = no loss."""
    if not idx:  # a rank with no rows in a short last batch still runs forward and backward (collectives)
        return (torch.full((1, 1), pad_id, dtype=torch.long, device=device),
                torch.full((1, 1), -100, dtype=torch.long, device=device))
    T = max(len(examples[i][0]) for i in idx)
    x = torch.full((len(idx), T), pad_id, dtype=torch.long)
    y = torch.full((len(idx), T), -100, dtype=torch.long)
    for r, i in enumerate(idx):
        ids, mask = examples[i]
        x[r, :len(ids)] = torch.tensor(ids)
        tgt = torch.tensor(ids[1:])
        tgt[torch.tensor(mask[1:]) == 0] = -100
        y[r, :len(ids) - 1] = tgt
    return x.to(device), y.to(device)


def lr_at(step: int, cfg: SFTConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def configure_optimizer(model, cfg: SFTConfig, device: str):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device == "cuda")


# PaLM appendix B: 6N FLOPs per token for the weights plus 12·L·H·D·T for attention (fwd + bwd).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(cfg: ModelConfig, n_params: int, T: int) -> float:
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T


def peak_flops(device: str) -> float:
    if device != "cuda":
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


# -----------------------------------------------------------------------------------------------
# Checkpoint I/O


def save_checkpoint(out: str, model, tok, cfg: SFTConfig, state: dict, weights: dict = None):
    """One atomic directory: HF-layout weights (`weights` if given, else the model's), tokenizer,
    train_state.pt (optimizer, step, RNG, ...) and the config."""
    buf = io.BytesIO()
    torch.save(state, buf)

    def extra(tmp: Path):
        tok.save(tmp)
        (tmp / "train_state.pt").write_bytes(buf.getvalue())
        (tmp / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    model.save_pretrained(out, dtype=torch.float32, extra=extra, state_dict=weights)


def append_metrics(out: str, row: dict):
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(out: str, step: int):
    """On resume, forget log lines written after the checkpoint we resume from."""
    p = Path(out) / "metrics.jsonl"
    if p.exists():
        keep = [l for l in p.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        tmp = p.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, p)


# -----------------------------------------------------------------------------------------------
# Many processes: `torchrun --nproc_per_node=N sft.py ...` runs N copies of this script, one per device.
# Every rank reads the same data and computes the same batch order; rank r takes rows r, r+N, r+2N, ...
# of each global micro-batch, so the global batch, the step count and the learning-rate schedule do
# not depend on N. Only rank 0 prints and writes. ppo.py uses the same helpers.


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL between GPUs, gloo between CPU processes. (0, 1) without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # from here on "cuda" is this rank's GPU
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over all ranks (a new tensor, no gradient); x itself on one process."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def rank_rows(idx: list, rank: int, world: int) -> list:
    """This rank's rows of a global batch: every world-th one, starting at rank."""
    return idx[rank::world]


def wrap_for_training(model, device: str, fsdp: bool, bf16: bool):
    """DDP keeps a full copy per rank and averages gradients in backward. FSDP2 shards weights,
    gradients and optimizer state over the ranks, one unit per Block plus the root (embeddings, final
    norm, head); a unit's full weights exist only during its forward and backward. Returns the module
    to train through; with FSDP the model itself, changed in place."""
    if world_size() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 compute, fp32 master weights and fp32 gradient reduction
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        from model import Block
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)


@contextmanager
def no_grad_sync(wrapped, skip: bool):
    """Within: backward accumulates local gradients without the cross-rank reduction (gradient
    accumulation micro-steps; the last micro-step of an optimizer step syncs the sum)."""
    if not skip or world_size() == 1:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    else:  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def lm_head_weight(module):
    """The output projection of a model that may be DDP-wrapped. Under FSDP the root unit (embeddings,
    norm, head) stays gathered from its forward to its backward, so after a forward this is the full matrix."""
    return getattr(module, "module", module).lm_head_weight


def clip_grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a replicated DTensor


def training_state(model, opt) -> tuple[dict, dict]:
    """(weights, optimizer state) as one process holds them, keyed by parameter name. Under FSDP the
    shards are gathered onto rank 0 (a collective: every rank calls it; the others get empty dicts),
    so a checkpoint written by N ranks resumes under any number of ranks, one included."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if state["state"] and isinstance(next(iter(state["state"])), int):  # a plain opt.state_dict() (older runs)
        opt.load_state_dict(fuse_optimizer_state(state, opt, model))
        return
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP: each rank takes its shard
    set_optimizer_state_dict(model, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True) if sharded else None)


# -----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_loss(model, examples, cfg: SFTConfig, pad_id: int, device, autocast, rank: int = 0, world: int = 1) -> float:
    """Mean NLL per loss token over the held-out examples (each rank scores its rows of each batch)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (NLL sum, token count)
    idx = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for k in range(0, len(idx), cfg.batch_size):
        x, y = collate(examples, rank_rows(idx[k:k + cfg.batch_size], rank, world), pad_id, device)
        with autocast:
            nll, n = chunked_cross_entropy(model(x, logits=False), lm_head_weight(model), y)
        total[0] += nll
        total[1] += n
    model.train()
    total = all_sum(total)
    return float(total[0] / total[1].clamp(min=1))


# -----------------------------------------------------------------------------------------------
# Training


def setup(cfg: SFTConfig):
    """Validate every input before anything is written: model, tokenizer, data."""
    from tokenizer import Tokenizer
    check_config(cfg)
    out = Path(cfg.out)
    check_out_dir(out, cfg.resume, cfg.overwrite)
    if cfg.init == "auto":  # resolved here, so the printed and the saved config say which it was
        cfg.init = "base" if (Path("base") / "config.json").exists() else "scratch"
    init = cfg.init
    src = str(out) if cfg.resume else init
    if src == "scratch":
        if not cfg.tokenizer:
            raise DataError("--init scratch needs --tokenizer DIR (e.g. the one `python tokenizer.py train` writes)")
        tok = Tokenizer.load(cfg.tokenizer)
        if cfg.model not in CONFIGS:
            raise DataError(f"--model {cfg.model!r}: expected one of {sorted(CONFIGS)}")
        mc = dict(CONFIGS[cfg.model])
        mc["vocab_size"] = (tok.vocab_size + 63) // 64 * 64  # padded to a multiple of 64 for fast matmuls
        mc.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig(**mc), attn=cfg.attn)
    else:
        if not (Path(src) / "config.json").exists():
            raise DataError(f"--init {src}: not a checkpoint directory (no config.json)")
        model = Transformer.from_pretrained(src, attn=cfg.attn)
        tok = Tokenizer.load(cfg.tokenizer or src)
        if tok.vocab_size > model.config.vocab_size:
            raise DataError(f"--init {src}: tokenizer has {tok.vocab_size} ids but the model only "
                            f"{model.config.vocab_size} embedding rows")
    train, truncated = load_examples(cfg.data, tok, cfg.max_len)
    if cfg.eval_data:
        held, _ = load_examples(cfg.eval_data, tok, cfg.max_len)
    else:  # a fixed slice, the same on resume
        n_eval = min(len(train) // 2, max(1, int(len(train) * cfg.eval_frac))) if cfg.eval_frac > 0 else 0
        held, train = train[len(train) - n_eval:], train[:len(train) - n_eval]
    replayed = replay_examples(cfg, tok, len(train)) if cfg.replay else []
    train += replayed
    problems = None
    if cfg.eval_problems:
        from data import load_problems
        problems = load_problems(cfg.eval_problems)[:cfg.eval_problems_n]
    return model, tok, train, held, truncated, len(replayed), problems


def train(cfg: SFTConfig):
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    model, tok, examples, held, truncated, n_replayed, problems = setup(cfg)
    out = Path(cfg.out)
    model.to(device).train()
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device == "cuda")
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)
    n_params = model.num_params()
    wrapped = wrap_for_training(model, device, cfg.fsdp, use_bf16)  # what forward/backward go through
    fwd = torch.compile(wrapped) if cfg.compile else wrapped
    opt = configure_optimizer(model, cfg, device)
    if problems and cfg.fsdp and world > 1:
        say("--fsdp: answer accuracy during training is skipped (sharded decoding); run eval.py on the checkpoint")
        problems = None

    lengths = [len(ids) for ids, _ in examples]
    micro_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    replayed_note = f" ({n_replayed} of the train from {cfg.replay})" if n_replayed else ""
    say(f"model: {model.config.model_type} {n_params / 1e6:.2f}M params | data: {len(examples)} train, "
        f"{len(held)} held out{replayed_note}, {truncated} truncated to {cfg.max_len} tokens | "
        f"{total} steps x {cfg.batch_size * cfg.grad_accum} examples | device {device}"
        f"{' bf16' if use_bf16 else ''}{f' | {world} ranks, ' + ('FSDP' if cfg.fsdp else 'DDP') if world > 1 else ''}")
    say(json.dumps(asdict(cfg)))

    step, wall = 0, 0.0
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        st = torch.load(out / "train_state.pt", weights_only=True)
        load_optimizer_state(model, opt, st["optimizer"])
        step, wall = st["step"], st["wall_time_s"]
        torch.set_rng_state(st["rng"])
        if main:
            trim_metrics(out, step)
        say(f"resumed {out} at step {step}")

    def save():
        weights, optim = training_state(model, opt)  # every rank takes part; rank 0 gets the full state
        if main:
            state = {"optimizer": optim, "step": step, "wall_time_s": wall, "rng": torch.get_rng_state()}
            save_checkpoint(out, model, tok, cfg, state, weights)
        if world > 1:
            dist.barrier()  # nobody runs ahead (or exits) before the checkpoint is complete

    if not cfg.resume and main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    def evaluate_now():
        row = {"step": step}
        if held:
            row["eval_loss"] = eval_loss(fwd, held, cfg, tok.pad_id, device, autocast, rank, world)
        if problems:  # each rank decodes its share of the problems
            from eval import evaluate
            mine = problems[rank::world]
            model.eval()
            res = evaluate(model, tok, mine, batch_size=64, max_new_tokens=cfg.max_len, progress=False) if mine else None
            model.train()
            right = all_sum(torch.tensor([res["accuracy"] * len(mine) if res else 0.0], device=device, dtype=torch.float64))
            row["eval_accuracy"] = round(float(right[0])) / len(problems)
        return row

    flops_tok, peak = flops_per_token(model.config, n_params, cfg.max_len), peak_flops(device)
    bar = tqdm(total=total, initial=step, desc="sft", dynamic_ncols=True, disable=None if main else True)
    t_log, tok_log = time.time(), 0
    epoch, batches = -1, None
    while step < total:
        t0 = time.time()
        # 1. The micro-batches of this optimizer step, at a position that is a pure function of step;
        #    this rank's rows of each.
        micro = []
        for m in range(cfg.grad_accum):
            g = step * cfg.grad_accum + m
            if g // micro_per_epoch != epoch:
                epoch = g // micro_per_epoch
                batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
            micro.append(collate(examples, rank_rows(batches[g % micro_per_epoch], rank, world), tok.pad_id, device))
        # token-level mean over the whole step, on every rank
        n_tgt = all_sum(sum((y != -100).sum() for _, y in micro))
        # 2. Forward / backward, loss = mean NLL over the step's loss tokens. Each rank's loss is its
        #    share of that mean (its tokens' NLL sum / all ranks' token count); DDP and FSDP average
        #    gradients over ranks, so the share is scaled by world to make the average their sum.
        lr = lr_at(step, cfg, total)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for m, (x, y) in enumerate(micro):
            with no_grad_sync(wrapped, skip=m < len(micro) - 1), autocast:
                hidden = fwd(x, logits=False)  # (B, T, d): the (B, T, V) logits exist one chunk at a time
                # fused on CUDA: the loss's gradients are computed in its forward (no recompute); FSDP's
                # sharded weight takes the checkpointed path
                fused = device == "cuda" and not cfg.fsdp
                loss = chunked_cross_entropy(hidden, model.lm_head_weight, y, fused=fused)[0] / n_tgt
                (loss * world).backward()
            loss_sum += loss.detach()
            tok_log += x.numel()
        loss_sum = float(all_sum(loss_sum))
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum} at step {step}; stopped, the last checkpoint in {out} is intact")
        # 3. Clip and step.
        gnorm = clip_grad_norm(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        wall += time.time() - t0
        bar.update(1)
        # 4. Log, evaluate, save.
        row = None
        if step % cfg.log_every == 0 or step == total:
            dt = time.time() - t_log
            tps = float(all_sum(torch.tensor(float(tok_log), device=device))) / max(dt, 1e-9)  # all ranks
            row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tok_per_s": tps, "wall_time_s": wall}
            msg = f"step {step}/{total} loss {loss_sum:.4f} lr {lr:.2e} gnorm {gnorm:.2f} tok/s {tps:,.0f}"
            if peak:
                row["mfu"] = tps * flops_tok / (peak * world)
                msg += f" mfu {100 * row['mfu']:.1f}%"
            if main:
                bar.write(msg)
            t_log, tok_log = time.time(), 0
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            ev = evaluate_now()
            if main and len(ev) > 1:  # (no held-out pairs and no problems: nothing to show)
                bar.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
            row = {**(row or {"step": step, "wall_time_s": wall}), **ev}
        if row and main:
            append_metrics(out, row)
        if (cfg.save_every and step % cfg.save_every == 0) or step in (total, cfg.stop_at):
            save()
        if step == cfg.stop_at:
            break
    bar.close()
    say(f"done: {step} steps in {wall:.1f}s of training; checkpoint in {out}")
    return model


def parse_config(cls, doc: str, argv=None):
    """Flags mirror the config dataclass (data.config_flags: field `max_steps` is `--max-steps`, its comment
    the help). ppo.py parses its PPOConfig the same way."""
    from data import config_flags
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    config_flags(ap, cls)
    return cls(**vars(ap.parse_args(argv)))


def parse_args(argv=None) -> SFTConfig:
    return parse_config(SFTConfig, __doc__, argv)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
