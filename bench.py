"""
Performance of our model against HF transformers, measured in the same run on the same device, with
random weights (nothing downloaded).

    python bench.py                    # CPU: embedded config, training and sampling tok/s against HF, and
                                       # the host's cost of an eager decode step (16 layers at width 64)
    python bench.py --device cuda      # GPU: the four sections below at the llama-1b shape (about 6 minutes)
    python bench.py --small            # the four sections with tiny shapes: seconds on a CPU (run by the tests)
    python bench.py --device cuda --sections 2,3 --out bench.json    # some sections, in that order; tables to a file
    python bench.py --device cuda --sections 1,2 --profile prof.txt   # and where the time goes (torch.profiler)

The sections (each a markdown table: figure | ours | HF | ratio | peak GB):
  1. training step tok/s and MFU, llama-1b, B8 T1024, bf16 autocast, fused AdamW: ours eager, with
     attn="triton", compiled, against HF eager and compiled. HF computes its own loss from `labels`; ours
     is cross_entropy.chunked_cross_entropy on the hidden states. "Compiled" is torch.compile of each decoder
     layer on both sides (the layers are identical, so one compile serves all 16).
  2. sampling tok/s, prompt 128, 256 new tokens, temperature 1, batch 1 and 64, bf16 weights: ours eager
     and compiled (the forward and the sampling as one CUDA graph), against HF `generate` (dynamic cache)
     and HF with cache_implementation="static", with which transformers compiles the decoding forward
     itself (mode "reduce-overhead"; ours adds coordinate descent tuning: model.DECODE_COMPILE_OPTIONS).
     Also correctness checks: greedy tokens eager == compiled, and sampled tokens eager == compiled for
     the same seed.
  3. attention forward and forward+backward TFLOP/s at the 1B head shape (H32 K8 D64), B8, T 1024 and
     4096, bf16, causal: attention.py's Triton kernel against PyTorch SDPA, GPU time of calls issued back to
     back (the other sections time each call from an idle GPU, host work included).
  4. one PPO iteration of the 1B policy (64 rollouts of 256 tokens, reference + value forward, one epoch
     of 4 minibatches), ours against the same steps done with HF models, split into its phases.

ratio = ours / HF for throughputs and HF time / ours time for times: above 1 means ours is faster.
Peak GB is torch.cuda.max_memory_allocated over the timed runs (reset before each measurement).
Timings are medians over repeats after warm-up; measurements, never assertions. A cell that fails
prints its error and the run goes on; cells that would overrun --time-budget are skipped. The exit
status is 1 when a correctness check fails.
"""

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cross_entropy import chunked_cross_entropy, chunked_token_logprobs
from model import (CONFIGS, ModelConfig, Transformer, compiled_cache_len, compiled_decode_sample_step, generate, ours_to_hf,
                   pick_attention_backend, race_noise)


@dataclass
class BenchConfig:
    config: str = ""  # named model config ("" = embedded for the CPU comparison, llama-1b for the sections)
    batch: int = 16  # CPU comparison: training batch (sequences)
    seq: int = 256  # CPU comparison: training sequence length
    sample_batch: int = 64  # CPU comparison: sampling batch
    prompt: int = 32  # CPU comparison: sampling prompt length
    new_tokens: int = 64  # CPU comparison: sampled tokens per row
    repeats: int = 3  # CPU comparison: timed repeats (median reported)
    device: str = "auto"
    small: bool = False  # the sections with tiny shapes, for a quick check on a CPU
    sections: str = ""  # which sections to run, in this order, e.g. "2,1" ("" = all, cheapest first: RUN_ORDER)
    out: str = ""  # also write the results here: .md for the tables, anything else for JSON
    time_budget: float = -1.0  # seconds; cells that would overrun it are skipped (-1: 330 for the 1B run, else none)
    profile: str = ""  # also write torch.profiler tables here (a training step, ours and HF; one compiled generate)
    attention_tiles: str = ""  # the attention kernels' tiles from this file (bench_attention.py --save-tiles), if it exists


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_twin(ours: Transformer, dtype=None):
    """The same weights in a transformers model on the same device (built there, no disk round trip)."""
    import transformers
    d = ours.config.to_hf()
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    w = ours.lm_head_weight
    with torch.device(w.device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype or w.dtype, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(ours_to_hf(ours.state_dict(), ours.config), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"hf_twin: missing {missing}, unexpected {unexpected}")
    return hf.to(w.device)


# -----------------------------------------------------------------------------------------------
# The CPU comparison (python bench.py): embedded config, full logits on both sides.


def bench_training(ours, hf, cfg: BenchConfig, device):
    V = ours.config.vocab_size
    x = torch.randint(0, V, (cfg.batch, cfg.seq), device=device)
    results = {}
    for name, m in (("ours", ours), ("hf", hf)):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            out = m(x)
            logits = out if torch.is_tensor(out) else out.logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results[name] = cfg.batch * cfg.seq / timed(step, device, cfg.repeats)
    return results


@torch.no_grad()
def bench_sampling(ours, hf, cfg: BenchConfig, device):
    V = ours.config.vocab_size
    prompts = torch.randint(1, V, (cfg.sample_batch, cfg.prompt))
    ours.eval(), hf.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    results = {}
    results["ours"] = cfg.sample_batch * cfg.new_tokens / timed(
        lambda: generate(ours, prompts.tolist(), cfg.new_tokens, temperature=1.0, pad_id=0, generator=gen),
        device, cfg.repeats)
    ids = prompts.to(device)
    mask = torch.ones_like(ids)
    results["hf"] = cfg.sample_batch * cfg.new_tokens / timed(
        lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0),
        device, cfg.repeats)
    return results


def cpu_comparison(cfg: BenchConfig, device):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**CONFIGS[cfg.config or "embedded"])).to(device)
    hf = hf_twin(ours)
    print(f"device {device} ({torch.get_num_threads()} threads), config {cfg.config or 'embedded'}, "
          f"{ours.num_params() / 1e6:.2f}M params, torch {torch.__version__}")
    rows = []
    tr = bench_training(ours, hf, cfg, device)
    rows.append((f"train fwd+bwd+AdamW tok/s (B{cfg.batch} T{cfg.seq})", tr["ours"], tr["hf"]))
    sa = bench_sampling(ours, hf, cfg, device)
    rows.append((f"sampling tok/s (B{cfg.sample_batch}, prompt {cfg.prompt}, {cfg.new_tokens} new)", sa["ours"], sa["hf"]))
    # The host's cost of an eager decode step: llama-1b's 16 layers, its rope and its 4 query heads per kv
    # head, at widths where the arithmetic is negligible, so the time is Python and operator dispatch. A GPU
    # decoding eagerly waits on exactly this (it runs each small kernel faster than the host issues the next).
    deep = Transformer(ModelConfig(**dict(CONFIGS["llama-1b"], hidden_size=64, intermediate_size=128, vocab_size=512,
                                          num_attention_heads=8, num_key_value_heads=2))).to(device)
    sa = bench_sampling(deep, hf_twin(deep), replace(cfg, sample_batch=4, prompt=16), device)
    rows.append(("same, llama-1b's depth at width 64, B4 (host cost)", sa["ours"], sa["hf"]))
    print(f"| {'figure':<55} | {'ours':>12} | {'HF transformers':>15} | {'ratio':>6} |")
    print(f"|{'-' * 57}|{'-' * 14}|{'-' * 17}|{'-' * 8}|")
    for name, a, b in rows:
        print(f"| {name:<55} | {a:>12,.0f} | {b:>15,.0f} | {a / b:>5.2f}x |")
    return rows


# -----------------------------------------------------------------------------------------------
# The sections (GPU, or --small anywhere)


@dataclass
class Shapes:
    config: str = "llama-1b"
    tiny: bool = False  # shrink the config's widths and depth (--small)
    train_batch: int = 8
    train_seq: int = 1024
    chunk_rows: Optional[int] = None  # rows per chunk of the chunked losses (None: the losses' own defaults)
    prompt: int = 128
    new_tokens: int = 256
    sample_batches: tuple = (1, 64)
    attn_batch: int = 8
    attn_seqs: tuple = (1024, 4096)
    ppo_rollouts: int = 64
    ppo_minibatch: int = 16
    warmup: int = 2  # untimed runs before a training or attention measurement (a compile happens in the first)
    repeats: int = 5  # timed training steps
    sample_repeats: int = 2  # timed generate calls (after one untimed)
    attn_repeats: int = 20


SMALL = Shapes(tiny=True, train_batch=2, train_seq=64, chunk_rows=32, prompt=8, new_tokens=16, sample_batches=(1, 4),
               attn_batch=1, attn_seqs=(64, 128), ppo_rollouts=4, ppo_minibatch=2, warmup=1, repeats=2,
               sample_repeats=1, attn_repeats=3)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


@dataclass
class Cell:
    value: Optional[float] = None  # a throughput or a time
    peak_gb: Optional[float] = None
    note: str = ""  # why there is no value (skipped, error)
    extra: str = ""  # shown after the value (MFU, fallback)


@dataclass
class Row:
    figure: str
    ours: Cell
    hf: Cell
    unit: str = "rate"  # "rate": ratio = ours / hf; "time" (seconds): ratio = hf / ours

    def ratio(self) -> Optional[float]:
        a, b = self.ours.value, self.hf.value
        if not a or not b:
            return None
        return a / b if self.unit == "rate" else b / a


@dataclass
class Section:
    number: int
    title: str
    baseline: str = "HF"
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def cell_text(c: Cell, unit: str) -> str:
    if c.value is None:
        return c.note or "-"
    return num(c.value) + (" s" if unit == "time" else "") + (f" ({c.extra})" if c.extra else "")


def markdown(s: Section) -> str:
    lines = [f"### {s.number}. {s.title}", "",
             f"| figure | ours | {s.baseline} | ratio | peak GB (ours / {s.baseline}) |", "|---|---|---|---|---|"]
    for r in s.rows:
        ratio = r.ratio()
        peak = " / ".join("-" if c.peak_gb is None else f"{c.peak_gb:.1f}" for c in (r.ours, r.hf))
        lines.append(f"| {r.figure} | {cell_text(r.ours, r.unit)} | {cell_text(r.hf, r.unit)} | "
                     f"{'-' if ratio is None else f'{ratio:.3g}x'} | {peak} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in s.notes])


def error_note(e: Exception) -> str:
    return f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def attempt(fn):
    """(fn(), None), or (None, a Cell holding the error) when it raises: the cells that need its result
    show that error and the others still run."""
    try:
        return fn(), None
    except Exception as e:
        return None, Cell(note=error_note(e))


class Bench:
    """Runs cells: measures them, keeps one failure from stopping the rest, enforces the time budget."""

    def __init__(self, device: str, shapes: Shapes, budget: float, profile: str = ""):
        self.device, self.S, self.budget, self.profile_path = device, shapes, budget, profile
        self.cuda = device == "cuda"
        self.t0 = time.time()
        self.checks = []  # (name, ok or None when skipped, detail)
        if profile:
            open(profile, "w").close()

    def profile(self, label: str, fn, rows: int = 20):
        """Append to the profile file the top `rows` operators and kernels of one fn() call (after one
        untimed call), by time on the device (CUDA) or the CPU. Where the time goes, for the next change."""
        if not self.profile_path:
            return
        from torch.profiler import ProfilerActivity, profile
        try:
            fn()
            sync(self.device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            with profile(activities=acts) as prof:
                fn()
                sync(self.device)
            key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
            text = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except Exception as e:  # a profile is a diagnostic: it must not end the benchmark
            text = error_note(e)
        with open(self.profile_path, "a") as f:
            f.write(f"## {label}\n\n{text}\n\n")
        print(f"[{time.time() - self.t0:5.0f}s] profile: {label} -> {self.profile_path}", flush=True)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)

    def model_config(self, **kw) -> ModelConfig:
        mc = dict(CONFIGS[self.S.config])
        if self.S.tiny:
            mc.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
        return ModelConfig(**{**mc, **kw})

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def measure(self, fn, warmup: int, repeats: int, back_to_back: bool = False):
        """Median seconds of fn() over repeats after warmup calls, and the peak GB allocated while timed.
        Each call is timed from an idle device to its end (host work included: a training step or a whole
        generate is host and device together). back_to_back (CUDA): calls issued without waiting, each
        between two CUDA events, so the host prepares a call while the GPU runs the previous one, as for
        one layer inside a model: the GPU's time, for a single kernel's figure (bench_attention.kernel_ms)."""
        for _ in range(warmup):
            fn()
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if back_to_back and self.cuda:
            from bench_attention import kernel_ms
            return kernel_ms(fn, repeats) / 1e3, torch.cuda.max_memory_allocated() / 1e9
        times = []
        for _ in range(repeats):
            sync(self.device)
            t = time.perf_counter()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times), (torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None)

    def cell(self, label: str, fn, cost: float = 10.0, needs_cuda: bool = False) -> Cell:
        """fn() -> Cell. `cost` is a rough duration (s), for the budget check before starting it."""
        elapsed = time.time() - self.t0
        if needs_cuda and not self.cuda:
            c = Cell(note="skipped: needs CUDA")
        elif self.budget > 0 and elapsed + cost > self.budget:
            c = Cell(note=f"skipped: time budget {self.budget:.0f}s")
        else:
            try:
                c = fn()
            except Exception as e:  # one failing cell (an HF compile error, an OOM) must not end the run
                c = Cell(note=error_note(e))
            self.free()
        shown = cell_text(c, "rate") if c.value is None else num(c.value) + (f" ({c.extra})" if c.extra else "")
        peak = "" if c.peak_gb is None else f", peak {c.peak_gb:.1f} GB"
        print(f"[{time.time() - self.t0:5.0f}s] {label}: {shown}{peak}", flush=True)
        return c


def peak_flops(device: str) -> float:
    if device != "cuda":
        return 0.0
    return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), 0.0)


def section_train(b: Bench) -> Section:
    S, dev = b.S, b.device
    cfg = b.model_config()
    B, T = S.train_batch, S.train_seq
    sec = Section(1, f"Training step (fwd + bwd + AdamW), {S.config}{' (tiny)' if S.tiny else ''}, B{B} T{T}, "
                     f"{'bf16 autocast, fused AdamW' if b.cuda else 'fp32'}")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    ours = Transformer(cfg).to(dev).train()
    flops_tok = 6 * ours.num_params() + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    peak = peak_flops(dev)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=b.cuda)

    def tput(step, warmup):
        s, gb = b.measure(step, warmup, S.repeats)
        tps = B * T / s
        return Cell(tps, gb, extra=f"{100 * tps * flops_tok / peak:.1f}% MFU" if peak else "")

    def ours_step(fused=b.cuda):  # fused: the loss's gradients computed in its forward (as sft.py on CUDA)
        with b.autocast():
            h = ours(ids, logits=False)
            total, n = chunked_cross_entropy(h[:, :-1], ours.lm_head_weight, ids[:, 1:], S.chunk_rows, fused=fused)
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def with_triton():
        if not b.cuda or pick_attention_backend("triton") != "triton":
            return Cell(note="skipped: attn='triton' needs CUDA and Triton")
        ours.attn = "triton"
        try:
            return tput(ours_step, S.warmup)
        finally:
            ours.attn = "sdpa"

    def compiled(layers, step):
        for layer in layers:
            layer.compile()
        return tput(step, S.warmup + 1)

    check_fused_loss(b, ours, ids)
    eager = b.cell("1. train ours eager", lambda: tput(ours_step, S.warmup), cost=20)
    if eager.value is not None:
        b.profile(f"1. training step, ours eager ({S.config}, B{B} T{T})", ours_step)
    recomputed = b.cell("1. train ours eager, loss recomputed in the backward",
                        lambda: tput(lambda: ours_step(fused=False), S.warmup), cost=20, needs_cuda=True)
    triton = b.cell("1. train ours attn=triton", with_triton, cost=20)
    ours_c = b.cell("1. train ours compiled", lambda: compiled(ours.model.layers, ours_step), cost=30, needs_cuda=True)
    hf, err = attempt(lambda: hf_twin(ours, torch.float32).train())
    del ours, opt
    torch._dynamo.reset()
    b.free()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=b.cuda) if hf is not None else None

    def hf_step():
        with b.autocast():
            loss = hf(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    hf_eager = b.cell("1. train HF eager", lambda: err or tput(hf_step, S.warmup), cost=20)
    if hf_eager.value is not None:
        b.profile(f"1. training step, HF eager ({S.config}, B{B} T{T})", hf_step)
    hf_c = b.cell("1. train HF compiled", lambda: err or compiled(hf.model.layers, hf_step), cost=30, needs_cuda=True)
    del hf, opt
    torch._dynamo.reset()
    sec.rows = [Row("train tok/s, eager", eager, hf_eager), Row("train tok/s, compiled", ours_c, hf_c),
                Row("train tok/s, ours eager with the checkpointed (recomputing) loss", recomputed, hf_eager),
                Row("train tok/s, ours attn=triton vs HF eager", triton, hf_eager)]
    sec.notes = ["ours: cross_entropy.chunked_cross_entropy on forward(logits=False), fused on CUDA (gradients computed in "
                 "its forward); HF: its own loss from labels",
                 "compiled: torch.compile of each decoder layer (Block / LlamaDecoderLayer), eager elsewhere"]
    return sec


def check_fused_loss(b: Bench, model, ids):
    """The loss sft.py trains with on CUDA (chunked_cross_entropy(fused=True): gradients in the forward, each
    chunk's softmax gradient by cross_entropy.py's Triton kernel) against the checkpointed form (plain PyTorch
    ops, recomputed in the backward), under the same bf16 autocast: loss and every gradient. And ppo.py's token
    log-probs (cross_entropy.chunked_token_logprobs) through the same kernels against their checkpointed form."""
    def rel_grad_err(got, want):  # the largest relative (Frobenius) error over the parameters' gradients
        return max(((a - c).norm() / c.norm().clamp_min(1e-30)).item() for a, c in zip(got, want))

    name = "fused loss (Triton cross-entropy kernel) == checkpointed loss"
    if not b.cuda:
        b.checks.append((name, None, "needs CUDA"))
        b.checks.append(("token log-probs (Triton kernels) == checkpointed PyTorch form", None, "needs CUDA"))
        return
    try:
        x = ids[:2, :256]
        res = []
        for fused in (True, False):
            with b.autocast():
                total, n = chunked_cross_entropy(model(x, logits=False)[:, :-1], model.lm_head_weight, x[:, 1:],
                                                 fused=fused)
            grads = torch.autograd.grad(total / n, list(model.parameters()))
            res.append((total.detach(), grads))
        (l1, g1), (l2, g2) = res
        loss_err = ((l1 - l2).abs() / l2.abs()).item()
        grad_err = rel_grad_err(g1, g2)
        b.checks.append((name, loss_err < 1e-3 and grad_err < 2e-2,
                         f"B2 T256, bf16 autocast: loss rel diff {loss_err:.1e}, largest gradient rel diff {grad_err:.1e}"))
    except Exception as e:
        b.checks.append((name, False, error_note(e)))
    # ppo.py's scoring: chunked_token_logprobs through _TokenLogprobs and the kernels, against the checkpointed
    # PyTorch form (which entropy=True takes), at the rollout temperature ppo.py defaults to and at 0.5.
    name = "token log-probs (Triton kernels) == checkpointed PyTorch form"
    try:
        x = ids[:2, :256]
        worst = [0.0, 0.0]
        for temperature in (1.0, 0.5):
            res = []
            for kernel in (True, False):
                with b.autocast():
                    h = model(x, logits=False)[:, :-1]
                    logp = chunked_token_logprobs(h, model.lm_head_weight, x[:, 1:], temperature, entropy=not kernel)
                logp = logp if kernel else logp[0]
                res.append((logp.detach(), torch.autograd.grad(logp.sum(), list(model.parameters()))))
            (l1, g1), (l2, g2) = res
            worst[0] = max(worst[0], (l1 - l2).abs().max().item())
            worst[1] = max(worst[1], rel_grad_err(g1, g2))
        b.checks.append((name, worst[0] < 5e-2 and worst[1] < 2e-2,
                         f"B2 T256, bf16 autocast, T 1 and 0.5: largest log-prob diff {worst[0]:.1e}, "
                         f"largest gradient rel diff {worst[1]:.1e}"))
    except Exception as e:
        b.checks.append((name, False, error_note(e)))


def check_greedy_compiled(b: Bench):
    """Greedy tokens are equal with the sliced cache, with decode_step over the whole cache, and with the
    compiled decode_sample_step (fp32, ragged prompts); compiled twice, so the second call replays the CUDA
    graph. And sampled tokens (temperature 1, the same generator seed) equal eager and compiled."""
    if not b.cuda:
        b.checks.append(("greedy tokens eager == compiled decode step", None, "needs CUDA"))
        b.checks.append(("sampled tokens eager == compiled, same seed", None, "needs CUDA"))
        return
    m = None
    try:
        torch.manual_seed(1)
        m = Transformer(ModelConfig(**CONFIGS["embedded"])).to(b.device).eval()
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(1, 1024, (n,), generator=g).tolist() for n in (5, 17, 11)]
        eager = generate(m, prompts, 48, temperature=0.0, static=False)
        runs = [generate(m, prompts, 48, temperature=0.0, static=True)]
        runs += [generate(m, prompts, 48, temperature=0.0, compile=True) for _ in range(2)]
        same = [torch.equal(eager.tokens, r.tokens) for r in runs]
        lp = max((eager.logprobs - r.logprobs).abs().max().item() for r in runs)
        # batch 1 apart: there Inductor turns every matmul into its own multiply-and-sum (DECODE_COMPILE_OPTIONS)
        one = [generate(m, prompts[:1], 48, temperature=0.0, compile=c, static=False) for c in (False, True)]
        same.append(torch.equal(one[0].tokens, one[1].tokens))
        lp = max(lp, (one[0].logprobs - one[1].logprobs).abs().max().item())
        b.checks.append(("greedy tokens eager == compiled decode step", all(same),
                         f"B3 ragged prompts and B1, 48 tokens, fp32; equal to the sliced-cache tokens "
                         f"(B3: full cache, compiled, compiled again; B1: compiled): {same}, max logprob diff {lp:.1e}"))
    except Exception as e:
        b.checks.append(("greedy tokens eager == compiled decode step", False, error_note(e)))
    try:  # the race's noise is drawn outside the graph in the eager order, so the same seed samples the same
        sampled = [generate(m, prompts, 48, temperature=1.0, compile=c, generator=torch.Generator(b.device).manual_seed(3))
                   for c in (False, True)]
        same = torch.equal(sampled[0].tokens, sampled[1].tokens) and torch.equal(sampled[0].mask, sampled[1].mask)
        lp = (sampled[0].logprobs - sampled[1].logprobs).abs().max().item()
        b.checks.append(("sampled tokens eager == compiled, same seed", same,
                         f"B3, 48 tokens at temperature 1, fp32: tokens and masks equal: {same}, max logprob diff {lp:.1e}"))
    except Exception as e:
        b.checks.append(("sampled tokens eager == compiled, same seed", False, error_note(e)))
    if m is not None:
        m.caches = None
    torch._dynamo.reset()


@torch.no_grad()
def section_sample(b: Bench) -> Section:
    import transformers
    S, dev = b.S, b.device
    P, N = S.prompt, S.new_tokens
    dtype = torch.bfloat16 if b.cuda else torch.float32
    sec = Section(2, f"Sampling, {S.config}{' (tiny)' if S.tiny else ''}, {str(dtype)[6:]} weights, prompt {P}, "
                     f"{N} new tokens, temperature 1")
    check_greedy_compiled(b)
    torch.manual_seed(0)
    ours = Transformer(b.model_config()).to(dev, dtype).eval()
    hf, err = attempt(lambda: hf_twin(ours).eval())
    V = ours.config.vocab_size
    gen = torch.Generator(device=dev).manual_seed(0)

    def rate(fn, B):
        s, gb = b.measure(fn, 1, S.sample_repeats)
        return Cell(B * N / s, gb)

    def decode_alone(B):
        """N replays of the graph generate(compile=True) just captured (decode_sample_step at temperature 1, on
        the cache it left on the model), with one noise tensor: the forward and the sampling, without the
        noise draw, the bookkeeping and the host loop around them."""
        S_max = compiled_cache_len(P, N)  # the cache generate(compile=True) captured its graph on
        ours.setup_cache(B, S_max)  # the same buffers (zeroed) the graph was captured on
        step = compiled_decode_sample_step()
        tok = torch.ones(B, 1, dtype=torch.long, device=dev)
        pos, slot = torch.full((B, 1), P, device=dev), torch.tensor(P, device=dev)
        key_mask = torch.ones(B, S_max, dtype=torch.bool, device=dev)
        noise = race_noise((B, V), dev, gen)

        def run():
            for _ in range(N):
                torch.compiler.cudagraph_mark_step_begin()
                step(ours, tok, pos, slot, key_mask, noise, 1.0, 0, 1.0)
        return rate(run, B)

    cells = {}
    for compiled in (False, True):
        for B in S.sample_batches:
            prompts = torch.randint(1, V, (B, P), generator=torch.Generator().manual_seed(B))
            plist, ids = prompts.tolist(), prompts.to(dev)
            am = torch.ones_like(ids)
            hf_kw = dict(attention_mask=am, max_new_tokens=N, min_new_tokens=N, do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, pad_token_id=0)
            if compiled:
                hf_kw["cache_implementation"] = "static"
            tag = "compiled" if compiled else "eager"
            cells[("ours", B, compiled)] = b.cell(
                f"2. sample ours {tag} B{B}", lambda: rate(lambda: generate(
                    ours, plist, N, temperature=1.0, generator=gen, compile=compiled), B),
                cost=60 if compiled else 15, needs_cuda=compiled)
            if compiled and cells[("ours", B, True)].value is not None:  # not when the budget skipped it
                b.profile(f"2. generate(compile=True), B{B}, {N} tokens", lambda: generate(
                    ours, plist, N, temperature=1.0, generator=gen, compile=True))
            if not compiled and B == max(S.sample_batches) and cells[("ours", B, False)].value is not None:
                # eager decoding issues ~900 kernels a token: the profile's host total against its device
                # total says whether launches or the GPU set its pace (fewer tokens: the profiler's own cost)
                b.profile(f"2. generate eager, B{B}, {max(N // 8, 1)} tokens", lambda: generate(
                    ours, plist, max(N // 8, 1), temperature=1.0, generator=gen))
            if compiled:
                cells[("alone", B)] = b.cell(f"2. decode graph alone (replay) B{B}", lambda: decode_alone(B),
                                             cost=10, needs_cuda=True)
            ours.caches = None
            cells[("hf", B, compiled)] = b.cell(
                f"2. sample HF {'static cache + compiled' if compiled else 'default'} B{B}",
                lambda: err or rate(lambda: hf.generate(ids, **hf_kw), B), cost=40 if compiled else 25,
                needs_cuda=compiled)
    for B in S.sample_batches:
        sec.rows.append(Row(f"sample tok/s B{B}, eager", cells[("ours", B, False)], cells[("hf", B, False)]))
        sec.rows.append(Row(f"sample tok/s B{B}, compiled", cells[("ours", B, True)], cells[("hf", B, True)]))
        sec.rows.append(Row(f"tok/s B{B}, our decode graph alone (HF: -)", cells[("alone", B)], Cell(note="-")))
    sec.notes = ["decode graph alone: the CUDA graph of generate(compile=True) (forward and sampling) replayed N "
                 "times, without the noise draw, the bookkeeping and the host loop: its gap to 'compiled' is what "
                 "those cost; profile.txt splits the graph's own time by kernel",
                 "compiled: ours generate(compile=True) (forward and sampling as one CUDA graph); HF generate with "
                 f"cache_implementation='static' (transformers {transformers.__version__} compiles the decoding "
                 "forward itself, mode reduce-overhead)"]
    del ours, hf
    torch._dynamo.reset()
    return sec


def section_attention(b: Bench) -> Section:
    import attention as A
    S, dev = b.S, b.device
    cfg = b.model_config()
    H, K, D, B = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, S.attn_batch
    dtype = torch.bfloat16 if b.cuda else torch.float32
    sec = Section(3, f"Attention TFLOP/s, causal, B{B} H{H} K{K} D{D}, {str(dtype)[6:]}", baseline="SDPA")
    for T in S.attn_seqs:
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=dtype, generator=g).requires_grad_() for h in (H, K, K))
        do = torch.randn_like(q)
        kernel = A.kernel_runs_on(q) and D in A.HEAD_DIMS
        extra = "" if kernel and q.is_cuda else "Triton interpreter" if kernel else "attention.py's fallback"
        flops = 4 * B * H * T * T * D / 2  # two matmuls over half the score matrix

        def run(attn, backward, mult, extra=""):
            def fn():
                if not backward:
                    with torch.no_grad():
                        return attn()
                q.grad = k.grad = v.grad = None
                attn().backward(do)
            s, gb = b.measure(fn, S.warmup, S.attn_repeats, back_to_back=True)
            return Cell(flops * mult / s / 1e12, gb, extra=extra)

        ours = lambda: A.flash_attention(q, k, v, None)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != K)
        for name, backward, mult in (("fwd", False, 1.0), ("fwd+bwd", True, 3.5)):  # backward = 2.5x forward
            a = b.cell(f"3. attention ours {name} T{T}", lambda: run(ours, backward, mult, extra), cost=15)
            c = b.cell(f"3. attention SDPA {name} T{T}", lambda: run(sdpa, backward, mult), cost=5)
            sec.rows.append(Row(f"attention {name} TFLOP/s, T{T}", a, c))
        del q, k, v, do
    return sec


def section_ppo(b: Bench) -> Section:
    from ppo import compute_gae, logprobs_from_logits, policy_loss, value_loss
    S, dev = b.S, b.device
    n, P, N, mb = S.ppo_rollouts, S.prompt, S.new_tokens, S.ppo_minibatch
    sec = Section(4, f"One PPO iteration, {S.config}{' (tiny)' if S.tiny else ''} policy: {n} rollouts of {N} tokens "
                     f"after a {P}-token prompt, reference + value forward, 1 epoch of {n // mb} minibatches of {mb}")
    cfg = b.model_config()
    torch.manual_seed(0)
    prompts = torch.randint(1, cfg.vocab_size, (n, P), generator=torch.Generator().manual_seed(3))
    scores = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(4)).float().to(dev)
    policy = Transformer(cfg).to(dev)
    ref = Transformer(cfg).to(dev)
    ref.load_state_dict(policy.state_dict())
    ref = ref.to(torch.bfloat16 if b.cuda else torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    head0 = (torch.randn(1, cfg.hidden_size, generator=g) * 0.01).to(dev)

    def ours_rollout(m, N, compile=False):
        gen = torch.Generator(device=dev).manual_seed(0)
        return generate(m, prompts.tolist(), N, temperature=1.0, generator=gen, compile=compile).tokens

    def ours_score(m, ids, toks):
        h = m(ids, logits=False)[:, P - 1:P - 1 + toks.shape[1]]  # (b, N, d): the states that predict toks
        return chunked_token_logprobs(h, m.lm_head_weight, toks, 1.0, S.chunk_rows or 1024), h

    def hf_rollout(m, N):
        ids = prompts.to(dev)
        return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)[:, P:]

    def hf_score(m, ids, toks):
        h = m.model(input_ids=ids, use_cache=False).last_hidden_state  # (b, P+N, d), after the final norm
        logits = m.lm_head(h)  # (b, P+N, V): what HF's forward computes
        sl = slice(P - 1, P - 1 + toks.shape[1])
        return logprobs_from_logits(logits[:, sl], toks, 1.0), h[:, sl]

    def iteration(policy, ref, rollout, score, N, rows):
        """One PPO iteration with rows rollouts of N tokens -> {phase: Cell}."""
        head = nn.Linear(cfg.hidden_size, 1).to(dev)
        with torch.no_grad():
            head.weight.copy_(head0), head.bias.zero_()
        opt = torch.optim.AdamW(list(policy.parameters()) + list(head.parameters()), lr=1e-6, fused=b.cuda)
        out = {}

        def phase(name, fn):
            sync(dev)
            if b.cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = fn()
            sync(dev)
            out[name] = Cell(time.perf_counter() - t, torch.cuda.max_memory_allocated() / 1e9 if b.cuda else None)
            return res

        def forward_all():
            with torch.no_grad(), b.autocast():
                old, vals, refs = [], [], []
                for s in range(0, rows, mb):
                    lp, h = score(policy, ids[s:s + mb], toks[s:s + mb])
                    old.append(lp), vals.append(head(h.float()).squeeze(-1))
                    refs.append(score(ref, ids[s:s + mb], toks[s:s + mb])[0])
            return torch.cat(old), torch.cat(vals), torch.cat(refs)

        def update():
            rewards = -0.05 * (old_lp - ref_lp)
            rewards[:, -1] += scores[:rows]
            adv, ret = compute_gae(rewards, old_v, mask)
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            for s in range(0, rows, mb):
                with b.autocast():
                    lp, h = score(policy, ids[s:s + mb], toks[s:s + mb])
                    v = head(h.float()).squeeze(-1)
                pl, _ = policy_loss(lp, old_lp[s:s + mb], adv[s:s + mb], mask[s:s + mb])
                vl, _ = value_loss(v, old_v[s:s + mb], ret[s:s + mb], mask[s:s + mb])
                (pl + 0.1 * vl).backward()
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

        policy.eval()
        with b.autocast():
            toks = phase("rollout", lambda: rollout(policy, N)[:rows])
        ids = torch.cat([prompts[:rows].to(dev), toks], 1)
        mask = torch.ones(rows, N, device=dev)
        old_lp, old_v, ref_lp = phase("forward", forward_all)
        policy.train()
        phase("update", update)
        out["total"] = Cell(sum(c.value for c in out.values()), max((c.peak_gb or 0) for c in out.values()) or None)
        return out

    def run(policy, ref, rollout, score, warm_full=False):
        iteration(policy, ref, rollout, score, 4, mb)  # warm-up: every kernel once, small
        if warm_full:  # a compiled rollout: capture its graph at the timed shape before timing
            with b.autocast():
                rollout(policy.eval(), N)
        return iteration(policy, ref, rollout, score, N, n)

    results = {}

    def side(name, *args):
        try:
            if b.budget > 0 and time.time() - b.t0 + 60 > b.budget:
                raise TimeoutError(f"skipped: time budget {b.budget:.0f}s")
            results[name] = run(*args)
        except Exception as e:
            note = str(e) if isinstance(e, TimeoutError) else error_note(e)
            results[name] = {k: Cell(note=note) for k in ("rollout", "forward", "update", "total")}
        b.free()
        print(f"[{time.time() - b.t0:5.0f}s] 4. PPO {name}: " + ", ".join(
            f"{k} {cell_text(c, 'time')}" for k, c in results[name].items()), flush=True)

    side("ours", policy, ref, ours_rollout, ours_score)
    if b.cuda:
        side("ours, compiled rollout", policy, ref, lambda m, N: ours_rollout(m, N, compile=True), ours_score, True)
        policy.caches = None
    else:
        results["ours, compiled rollout"] = {k: Cell(note="skipped: needs CUDA") for k in ("rollout", "total")}
    hf_models, err = attempt(lambda: (hf_twin(policy, torch.float32), hf_twin(ref)))
    del policy, ref
    b.free()
    if err:
        results["HF"] = {k: err for k in ("rollout", "forward", "update", "total")}
    else:
        side("HF", *hf_models, hf_rollout, hf_score)
    del hf_models
    labels = {"rollout": f"rollout ({n} x {N} tokens)", "forward": "policy + reference + value forward (no grad)",
              "update": f"update ({n // mb} minibatches, fwd + bwd + AdamW)", "total": "iteration"}
    sec.rows = [Row(f"{labels[k]}, s", results["ours"][k], results["HF"][k], unit="time") for k in labels]
    oc = results["ours, compiled rollout"]
    sec.rows += [Row(f"{labels['rollout']}, ours with the compiled decode step (ppo.py --compile), s", oc["rollout"],
                     results["HF"]["rollout"], unit="time"),
                 Row("iteration, ours with the compiled rollout, s", oc["total"], results["HF"]["total"], unit="time")]
    sec.notes = ["rollouts without compile on both sides, and ours again with the compiled decode step; ours scores with forward(logits=False) + "
                 "chunked_token_logprobs, HF with full logits + ppo.logprobs_from_logits; GAE, policy and value "
                 "losses from ppo.py"]
    return sec


SECTIONS = {1: section_train, 2: section_sample, 3: section_attention, 4: section_ppo}
RUN_ORDER = (3, 4, 1, 2)  # cheapest first, so a tight time budget cuts the compile-heavy cells


def run_sections(cfg: BenchConfig, device: str) -> int:
    import transformers
    transformers.logging.set_verbosity_error()
    S = replace(SMALL if cfg.small else Shapes(), config=cfg.config or "llama-1b")
    budget = cfg.time_budget if cfg.time_budget >= 0 else (0.0 if cfg.small else 330.0)
    b = Bench(device, S, budget, cfg.profile)
    order = [x.strip() for x in cfg.sections.split(",") if x.strip()]
    if any(x not in {str(n) for n in SECTIONS} for x in order):
        print(f"error: --sections {cfg.sections}: expected numbers from {sorted(SECTIONS)}, e.g. 2,1", file=sys.stderr)
        return 2
    order = [int(x) for x in order] or list(RUN_ORDER)
    triton = getattr(__import__("attention").triton, "__version__", "missing")
    head = (f"device {torch.cuda.get_device_name() if b.cuda else f'cpu ({torch.get_num_threads()} threads)'}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton}, "
            f"config {S.config}{' (tiny)' if S.tiny else ''}, time budget {f'{budget:.0f}s' if budget else 'none'}")
    print(head, flush=True)
    if cfg.attention_tiles:  # a tile sweep of this card, run just before (make bench-gpu), instead of TILES as written
        import attention
        if not os.path.exists(cfg.attention_tiles):
            print(f"note: {cfg.attention_tiles} not found: attention tiles as written in attention.py", flush=True)
        else:
            try:
                print(f"attention tiles from {cfg.attention_tiles}: {attention.load_tiles(cfg.attention_tiles)}",
                      flush=True)
            except ValueError as e:  # (json's decode error is a ValueError too)
                print(f"error: --attention-tiles {e}", file=sys.stderr)
                return 2
    if not b.cuda:
        print("note: compile paths and the Triton kernel need CUDA; on this device they are skipped", flush=True)
    done = {}

    def check_lines():
        return [f"- {name}: {'skipped' if ok is None else 'PASS' if ok else 'FAIL'} ({detail})"
                for name, ok, detail in b.checks]

    def save():  # after every section, so a run stopped by a time limit keeps what it measured
        md = "\n\n".join([head] + [markdown(done[n]) for n in sorted(done)]
                         + ["### checks\n\n" + "\n".join(check_lines())])
        if cfg.out.endswith(".md"):
            text = md + "\n"
        else:
            text = json.dumps({
                "header": head, "markdown": md,
                "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in b.checks],
                "sections": [{"section": s.number, "title": s.title, "baseline": s.baseline, "notes": s.notes,
                              "rows": [{"figure": r.figure, "unit": r.unit, "ratio": r.ratio(),
                                        "ours": vars(r.ours), "baseline": vars(r.hf)} for r in s.rows]}
                             for s in (done[n] for n in sorted(done))]}, indent=1)
        with open(cfg.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(cfg.out + ".tmp", cfg.out)

    for n in dict.fromkeys(order):  # as listed, each once
        torch.manual_seed(0)
        try:
            done[n] = SECTIONS[n](b)
        except Exception as e:  # a section that fails in its setup (e.g. out of memory building the models)
            done[n] = Section(n, f"section {n}", notes=[error_note(e)])
        b.free()
        print("\n" + markdown(done[n]) + "\n", flush=True)
        if cfg.out:
            save()
    if b.checks:
        print("### checks\n\n" + "\n".join(check_lines()), flush=True)
    print(f"\ntotal {time.time() - b.t0:.0f}s", flush=True)
    return 1 if any(ok is False for _, ok, _ in b.checks) else 0


def main(argv=None) -> int:
    from sft import parse_config
    cfg = parse_config(BenchConfig, __doc__, argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here; on a CPU use --small or no --device", file=sys.stderr)
        return 2
    if cfg.small or device == "cuda":
        return run_sections(cfg, device)
    if "--sections" in (argv if argv is not None else sys.argv[1:]):
        print("error: the sections at the llama-1b shape need --device cuda; on a CPU use --small", file=sys.stderr)
        return 2
    cpu_comparison(cfg, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
