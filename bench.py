"""
Performance of our model against HF transformers, measured in the same run on the same device, with
random weights (nothing downloaded). Prints a table of throughputs and ratios.

    python bench.py                 # embedded config: training tok/s and sampling tok/s at batch 64
    python bench.py --small         # seconds on a CPU (what the test suite runs)
    python bench.py --config llama-1b --batch 8 --seq 1024 --device cuda   # the 1B-shaped config

Timings are medians over repeats after warm-up. They are measurements, never assertions: the numbers
depend on the machine, so compare ratios measured in one run.
"""

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import CONFIGS, ModelConfig, Transformer, generate


@dataclass
class BenchConfig:
    config: str = "embedded"  # named model config
    batch: int = 16  # training batch (sequences)
    seq: int = 256  # training sequence length
    sample_batch: int = 64  # sampling batch
    prompt: int = 32  # sampling prompt length
    new_tokens: int = 64  # sampled tokens per row
    repeats: int = 3  # timed repeats (median reported)
    device: str = "auto"
    small: bool = False  # tiny shapes, for a quick check on a CPU


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


def hf_twin(ours: Transformer, device):
    """The same weights in transformers (saved by us, loaded by AutoModelForCausalLM)."""
    import transformers
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                 attn_implementation="sdpa").to(device)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in BenchConfig.__dataclass_fields__.items():
        if v.type is bool or v.type == "bool":
            ap.add_argument("--" + k.replace("_", "-"), action="store_true")
        else:
            ap.add_argument("--" + k.replace("_", "-"), type=type(v.default), default=v.default)
    cfg = BenchConfig(**vars(ap.parse_args(argv)))
    if cfg.small:
        cfg.batch, cfg.seq, cfg.sample_batch, cfg.prompt, cfg.new_tokens, cfg.repeats = 4, 64, 8, 8, 16, 1
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    torch.manual_seed(0)
    mc = dict(CONFIGS[cfg.config])
    if cfg.small:
        mc.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    ours = Transformer(ModelConfig(**mc)).to(device)
    hf = hf_twin(ours, device)
    n = ours.num_params()
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else torch.get_num_threads()} "
          f"{'' if device == 'cuda' else 'threads'}), config {cfg.config}{' (small)' if cfg.small else ''}, "
          f"{n / 1e6:.2f}M params, torch {torch.__version__}")
    rows = []
    tr = bench_training(ours, hf, cfg, device)
    rows.append((f"train fwd+bwd+AdamW tok/s (B{cfg.batch} T{cfg.seq})", tr["ours"], tr["hf"]))
    sa = bench_sampling(ours, hf, cfg, device)
    rows.append((f"sampling tok/s (B{cfg.sample_batch}, prompt {cfg.prompt}, {cfg.new_tokens} new)", sa["ours"], sa["hf"]))
    print(f"| {'figure':<55} | {'ours':>12} | {'HF transformers':>15} | {'ratio':>6} |")
    print(f"|{'-' * 57}|{'-' * 14}|{'-' * 17}|{'-' * 8}|")
    for name, a, b in rows:
        print(f"| {name:<55} | {a:>12,.0f} | {b:>15,.0f} | {a / b:>5.2f}x |")
    return rows


if __name__ == "__main__":
    main()
