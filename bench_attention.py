"""
The GPU check and benchmark of attention.py's Triton flash attention, and its build report.

    python bench_attention.py                  # on a CUDA GPU: correctness, tile sweep, timings against SDPA
    python bench_attention.py --build-report   # anywhere: build for sm_90, print registers / spills / shared memory
    TRITON_INTERPRET=1 python bench_attention.py --small   # CPU dry run of the whole script (tiny shapes; tests)

On a GPU it (1) sweeps TUNE_CANDIDATES for each kernel and head dim at the largest timed shape and keeps
the fastest in attention.TILES (for this process; copy them into attention.py to keep them), timing only
the candidates whose results agree with SDPA's within bf16 tolerance, (2) checks
the kernels against the fp32 reference on fresh random inputs (causal and not, GQA, left and right
padding, T < S, T = 1, every forward variant, as the model calls it under autocast), with every output
NaN-filled before the run so an unwritten element cannot pass, and (3) times forward and
forward+backward against PyTorch's SDPA in the same process, printing a markdown table. Exit status 1
when a check fails, 2 without a GPU or Triton.

Timing: CUDA events around each call, the calls issued back to back (see kernel_ms), plus the same
calls each made from an idle GPU, which adds the host's launch latency per call.

The build report compiles the kernels for Hopper (sm_90) on a machine with no GPU, with Triton's own
compiler and the ptxas / cuobjdump it ships, and reads registers, spills, pipelined loads and shared
memory off the binaries, and whether Hopper's asynchronous products stay grouped (HGMMA per wait): whether
an edited kernel still builds, spills, loses its pipelining or serialises its products, before GPU time
is spent. The test suite runs it.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import attention as A


@dataclass
class BenchConfig:
    batch: int = 8  # B of the timed shapes
    heads: int = 32  # H (query heads)
    gqa_kv_heads: int = 8  # K of the grouped-query rows
    seqs: tuple = (1024, 2048)  # T = S of the timed shapes (causal)
    head_dims: tuple = (64, 128)  # D of the timed shapes
    reps: int = 20  # timed repetitions (median), after 3 warm-up runs
    tune: bool = True  # sweep TUNE_CANDIDATES at T = max(seqs) before timing
    save_tiles: str = ""  # write the sweep's winners here (attention.save_tiles), for bench.py --attention-tiles
    small: bool = False  # a dry run on the CPU under TRITON_INTERPRET=1 (tests): every line runs, figures mean nothing


# --small: tiny shapes, the interpreter's tiles, fp32 (the interpreter's bf16 is not faithful).
SMALL = BenchConfig(batch=1, heads=4, gqa_kv_heads=2, seqs=(32,), head_dims=(16,), reps=1, small=True)


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant]) tried per kernel: every value of {64, 128} x {4, 8} x
# {2, 3, 4} appears, without the full product (each candidate costs a compile of a few seconds); the forward's
# candidates come in its loop structures and load paths (variants 0-3), with the scores a tile ahead (9: 128-row
# tiles on 8 warps, and 64-row tiles on 4 warps, which keep the HGMMA groups at D128 where 8 warps serialise
# them, see the build report), and the best-known tiles in longest-first order (bit 4); the dQ kernel's
# best-known tiles also in longest-first order (a 5th field of 4). The backward kernels' candidates include their
# split loops (a 5th field with bit 1: branch-free loops over the tiles that need no mask, then the edges). A
# 6th field of the forward's tiles of 128 caps the registers so that
# two 8-warp programs fit on an SM (AHEAD needs 170 at D64; capped, ptxas spills 24 bytes), or four 4-warp ones.
# 128-key tiles issue a fifth fewer instructions per score than 64-key ones at D64 (the loop's fixed costs are
# spread over twice the keys) but take 232+ registers on 8 warps, one program per SM; two fit as 64-row tiles on
# 4 warps (242 registers), or as 128-row tiles capped at 128 registers (64 bytes spilled). dK/dV at D128: every
# 64-row candidate spills (80-400 bytes); (32, 128, 8, 2, 1) builds in 254 registers without.
TUNE_CANDIDATES = {
    "fwd": [(128, 64, 4, 3, 0), (128, 64, 8, 3, 0), (128, 128, 8, 3, 0), (64, 64, 4, 4, 0), (128, 64, 4, 2, 0),
            (128, 64, 4, 3, 1), (128, 64, 8, 3, 1), (128, 128, 8, 3, 1), (64, 64, 4, 4, 1), (128, 64, 8, 4, 1),
            (128, 64, 8, 3, 2), (128, 128, 8, 3, 2), (128, 64, 8, 3, 3), (128, 128, 8, 3, 3), (128, 64, 8, 4, 3),
            (128, 64, 8, 3, 4), (128, 64, 8, 3, 5), (128, 64, 8, 3, 6), (128, 64, 8, 3, 7),
            (128, 64, 8, 3, 9), (128, 64, 8, 4, 9), (64, 64, 4, 3, 9), (64, 64, 4, 2, 9), (64, 64, 4, 4, 9),
            (128, 64, 8, 3, 13), (64, 64, 4, 3, 13), (128, 64, 8, 3, 9, 128), (128, 64, 8, 3, 13, 128),
            (64, 64, 4, 2, 9, 128), (64, 128, 4, 3, 1), (128, 128, 8, 2, 1, 128)],
    "dkdv": [(64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2),
             (64, 128, 8, 3, 1), (64, 128, 8, 2, 1), (64, 64, 4, 3, 1), (64, 64, 4, 2, 1), (32, 128, 8, 2, 1)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2, 4), (128, 128, 8, 2, 4),
           (64, 64, 4, 2, 1), (64, 64, 4, 3, 1), (128, 64, 8, 2, 1), (128, 128, 8, 2, 1), (64, 64, 4, 2, 5)],
}
# The distinct forward variants: AHEAD (8) is a form of the split loops, so 8 + v builds what 9 + v does.
FWD_VARIANTS = [v for v in range(16) if not v & 8 or v & 1]
SMALL_CANDIDATES = {"fwd": [A.INTERPRET_TILES + (v,) for v in FWD_VARIANTS],
                    "dkdv": [A.INTERPRET_TILES, A.INTERPRET_TILES + (1,)],
                    "dq": [A.INTERPRET_TILES + (v,) for v in (0, 1, 4, 5)]}


def kernel_ms(fn, reps, sync_each=False):
    """Median milliseconds of fn() over reps calls, after 3 warm-up calls, each call between two CUDA events.
    The calls are issued back to back, as the layers of a model are: while the GPU runs one call the host
    prepares the next, so the figure is the GPU's time, and host time only where the host cannot keep up.
    sync_each=True waits for the GPU before every call instead, so the GPU idles while the host launches:
    that figure adds the host's per-call latency (Python wrapper, autograd, Triton's launcher), which a
    model running ahead of its GPU never sees, and is reported separately."""
    cuda = torch.cuda.is_available()
    for _ in range(3 if cuda else 1):
        fn()
    if not cuda:  # --small on the CPU: wall time, only so that every line runs
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        if sync_each:
            torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in events)
    return times[len(times) // 2]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: check() under the interpreter, in the tests


def _dtype(dtype):
    return dtype if torch.cuda.is_available() else torch.float32  # the interpreter computes in fp32 only


def _inputs(B, H, K, T, S, D, dtype, seed=0):
    g = torch.Generator(device=_device()).manual_seed(seed)
    return [torch.randn(shape, device=_device(), dtype=_dtype(dtype), generator=g).requires_grad_()
            for shape in ((B, H, T, D), (B, K, S, D), (B, K, S, D))]


def compile_in_parallel(run, cands):
    """Compile every candidate's kernels at once, on all the host's cores, before the sweep times them one by one
    (a compile takes a second or two; the sweep has about a hundred). run(c) makes the launches of candidate c;
    here each launch only compiles (Triton's warmup), in worker threads under Triton's AsyncCompileMode, and
    the compiled kernels land in the kernels' caches, where the timed launches find them. Best effort: a
    failure here costs nothing but the time, as every candidate compiles again on its first launch."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a Triton without it: each candidate compiles when first launched
        return
    kernels = (A._fwd_kernel, A._bwd_delta_kernel, A._bwd_dkdv_kernel, A._bwd_dq_kernel)

    def compile_only(k):
        return lambda *args, grid, warmup, **kw: type(k).run(k, *args, grid=grid, warmup=True, **kw)

    t = time.time()
    try:
        for k in kernels:
            k.run = compile_only(k)  # kernel[grid](...) calls self.run(..., warmup=False)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for c in cands:
                try:
                    run(c)
                except Exception:  # it fails again, and is reported, when the sweep launches it
                    pass
    except Exception as e:
        print(f"  (parallel compile skipped: {type(e).__name__}: {e})")
    finally:
        for k in kernels:
            k.__dict__.pop("run", None)  # back to the class's run
    print(f"  compiled {len(cands)} candidates on {os.cpu_count()} threads [{time.time() - t:.0f}s]")


def tune(cfg: BenchConfig):
    """Time each candidate tile config of each kernel on the largest causal shape; keep the fastest in TILES.
    A candidate must first give SDPA's output (forward) or gradients (backward kernels) within bf16
    tolerance, so that a variant that miscompiles at some tile size can never be the one chosen and timed."""
    B, H, T = cfg.batch, cfg.heads, max(cfg.seqs)
    for D in cfg.head_dims:
        q, k, v = _inputs(B, H, H, T, T, D, torch.bfloat16)
        first, end = A.no_padding(B, T, _device())
        o, lse = A._flash_forward(q, k, v, first, end, True)
        do = torch.randn_like(o)
        with torch.enable_grad():
            want_o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads = torch.autograd.grad(want_o, (q, k, v), do)
        want = {"fwd": (want_o.detach(),), "dkdv": grads, "dq": grads}
        for kind, cands in (SMALL_CANDIDATES if cfg.small else TUNE_CANDIDATES).items():
            def run(c):  # time one kernel's candidate; the other kernels keep their current tiles
                tiles = {name: A.TILES.get((name, D), A.INTERPRET_TILES) for name in ("fwd", "dkdv", "dq")} | {kind: c}
                if kind == "fwd":
                    return A._flash_forward(q, k, v, first, end, True, tiles)
                return A._flash_backward(do, q, k, v, o, lse, first, end, True, tiles)
            compile_in_parallel(run, cands)  # (under the CPU interpreter there is nothing to compile)
            timed = []
            for c in cands:
                try:
                    mine = slice(1, 3) if kind == "dkdv" else slice(0, 1)  # this kernel's outputs: dk, dv; o; dq
                    err = max(((g.float() - r.float()).norm() / r.float().norm()).item()
                              for g, r in zip(run(c)[mine], want[kind][mine]))
                    if not err < 2e-2:  # bf16 results differ from SDPA's by ~3e-3
                        print(f"  {kind} D={D} {c}: skipped (relative error {err:.1e} against SDPA)")
                        continue
                    timed.append((kernel_ms(lambda: run(c), 5), c))
                except Exception as e:  # e.g. out of shared memory for this tile size
                    print(f"  {kind} D={D} {c}: skipped ({type(e).__name__})")
            best = min(timed)
            A.TILES[(kind, D)] = best[1]
            listed = ", ".join(f"{c}={ms:.3f}ms" for ms, c in timed)
            print(f"  {kind:>4} D={D:<3}: {listed}  -> chosen {best[1]}")


def check(B, H, K, T, S, D, causal, dtype, left=None, right=None, tiles=None):
    """Ours vs the fp32 reference on fresh inputs: relative error of out, dq, dk, dv on real rows, every
    output written (outputs start NaN-filled), pad rows exactly 0. tiles: as FlashAttention's (None: TILES).
    Returns (ok, message)."""
    q, k, v = _inputs(B, H, K, T, S, D, dtype, seed=T * 7 + S)
    key_mask = torch.ones(B, S, dtype=torch.bool, device=_device())
    for b in range(B):
        key_mask[b, :(left or [0] * B)[b]] = False
        key_mask[b, S - (right or [0] * B)[b]:] = False
    mask = None
    if left or right:
        from model import causal_mask
        mask = causal_mask(key_mask, S - T, T)
    real = key_mask[:, S - T:][:, None, :, None]  # (B, 1, T, 1)
    bounds = A.padding_bounds(mask, T, S) if mask is not None else A.no_padding(B, S, _device())
    assert bounds is not None, "the model's mask was not recognised"
    A.FILL_NAN = True
    try:
        out = A.FlashAttention.apply(q, k, v, bounds[0], bounds[1], causal, tiles)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    finally:
        A.FILL_NAN = False
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = A.reference_attention(q32, k32, v32, mask, causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float() * real)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    errs = [rel(out * real, ref * real)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
    pad_zero = (out * ~real).abs().max().item() == 0 and (grads[0] * ~real).abs().max().item() == 0
    ok = finite and pad_zero and errs[0] < 1e-2 and max(errs[1:]) < 2e-2
    variant = ""
    if isinstance(tiles, dict):  # the variants (5th fields) of the three kernels
        v = {name: A.variant(t) for name, t in tiles.items()}
        variant = f" forward variant {v['fwd']}, dK/dV {v['dkdv']}, dQ {v['dq']}"
    msg = (f"B{B} H{H} K{K} T{T} S{S} D{D} {'causal' if causal else 'full'} {str(dtype)[6:]} left={left} "
           f"right={right}{variant}: rel err out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}, "
           f"all written {finite}, pad rows 0 {pad_zero} -> {'PASS' if ok else 'FAIL'}")
    return ok, msg


def benchmark(cfg: BenchConfig = BenchConfig()) -> int:
    t0 = time.time()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, Triton interpreter (--small)"
    print(f"{where}, torch {torch.__version__}, triton {A.triton.__version__}")
    if cfg.tune:
        print(f"tile sweep ({str(_dtype(torch.bfloat16))[6:]}, causal, B{cfg.batch} H{cfg.heads} T{max(cfg.seqs)}):")
        tune(cfg)
        if cfg.save_tiles:
            A.save_tiles(cfg.save_tiles)
    print(f"chosen tiles {A.TILES}{f' (saved to {cfg.save_tiles})' if cfg.tune and cfg.save_tiles else ''}  "
          f"[{time.time() - t0:.0f}s]")
    if cfg.small:  # the same kinds of case, at sizes the interpreter runs in seconds
        results = [check(1, 4, 4, 40, 40, 16, True, torch.float32), check(1, 4, 4, 20, 20, 32, False, torch.float32),
                   check(2, 4, 2, 5, 30, 16, True, torch.float32, left=[0, 7], right=[2, 0]),
                   check(2, 4, 1, 1, 33, 16, True, torch.float32, left=[0, 5])]
        fixed = {"fwd": A.INTERPRET_TILES, "dkdv": A.INTERPRET_TILES, "dq": A.INTERPRET_TILES}
        variant_case = (2, 4, 2, 37, 37, 16, True, torch.float32, [0, 9], [5, 0])
    else:
        results = [check(2, 8, 8, 1024, 1024, 128, True, torch.bfloat16),
                   check(2, 8, 2, 777, 777, 64, True, torch.bfloat16, left=[0, 100]),
                   check(2, 4, 4, 300, 300, 64, False, torch.float16),
                   check(2, 8, 2, 400, 400, 128, True, torch.float16, left=[10, 0], right=[50, 3]),
                   check(2, 8, 2, 5, 500, 128, True, torch.bfloat16, left=[0, 37]),
                   check(3, 8, 1, 1, 333, 64, True, torch.bfloat16, left=[0, 5, 200]),
                   check(4, 6, 2, 300, 300, 32, True, torch.bfloat16, left=[0, 50, 0, 299])]  # model.py's "embedded"
        fixed = {name: A.TILES[(name, 64)] for name in ("fwd", "dkdv", "dq")}
        variant_case = (2, 8, 2, 777, 777, 64, True, torch.bfloat16, [0, 100], [30, 0])
    for variant in FWD_VARIANTS:  # every forward variant the sweep may pick, on a padded GQA case
        tiles = fixed | {"fwd": fixed["fwd"][:4] + (variant,)}
        results.append(check(*variant_case[:8], left=variant_case[8], right=variant_case[9], tiles=tiles))
    for dkdv, dq in ((1, 1), (1, 5), (0, 4)):  # and the backward kernels' (split loops, longest first)
        tiles = fixed | {"dkdv": fixed["dkdv"][:4] + (dkdv,), "dq": fixed["dq"][:4] + (dq,)}
        results.append(check(*variant_case[:8], left=variant_case[8], right=variant_case[9], tiles=tiles))
    if torch.cuda.is_available():
        # As the model calls it under bf16 autocast: q, k in fp32 (RoPE promotes them), v in bf16.
        q, k, v = _inputs(2, 8, 2, 256, 256, 64, torch.float32)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = A.flash_attention(q, k, v.bfloat16())
        err = ((out.float() - A.reference_attention(q, k, v)).norm() / A.reference_attention(q, k, v).norm()).item()
        ok = out.dtype == torch.bfloat16 and out.stride(2) == 8 * 64 and err < 1e-2  # the kernel's (B, T, H, D) layout
        results.append((ok, f"under bf16 autocast with fp32 q/k: kernel used {out.stride(2) == 8 * 64}, "
                            f"rel err {err:.1e} -> {'PASS' if ok else 'FAIL'}"))
    for _, msg in results:
        print(msg)
    print(f"[{time.time() - t0:.0f}s]")
    # ms: calls issued back to back (GPU time, see kernel_ms); "synced": the GPU waits for the host before
    # every call, so the host's per-call latency is in it (the only way this table was measured before).
    print("\n| B | H | K | T | D | pass | ours ms | ours TFLOP/s | SDPA ms | SDPA TFLOP/s | SDPA time / ours "
          "| ours ms, synced | SDPA ms, synced |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = [(cfg.heads, T, D) for D in cfg.head_dims for T in cfg.seqs]
    shapes += [(cfg.gqa_kv_heads, max(cfg.seqs), D) for D in cfg.head_dims]
    B, H = cfg.batch, cfg.heads
    for K, T, D in shapes:
        q, k, v = _inputs(B, H, K, T, T, D, torch.bfloat16)
        do = torch.randn_like(q)
        ours = lambda: A.flash_attention(q, k, v, None)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
        flops = 4 * B * H * T * T * D / 2  # causal forward: two matmuls, half the score matrix
        for name, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # the backward counts 2.5x the forward (FlashAttention)
            f_ours, f_sdpa = ours, sdpa
            if name == "fwd+bwd":
                f_ours, f_sdpa = lambda: ours().backward(do), lambda: sdpa().backward(do)
            with torch.set_grad_enabled(name != "fwd"):
                a, b = kernel_ms(f_ours, cfg.reps), kernel_ms(f_sdpa, cfg.reps)
                a_sync, b_sync = kernel_ms(f_ours, cfg.reps, sync_each=True), kernel_ms(f_sdpa, cfg.reps, sync_each=True)
            tf = lambda ms: flops * mult / ms / 1e9
            print(f"| {B} | {H} | {K} | {T} | {D} | {name} | {a:.3f} | {tf(a):.0f} | {b:.3f} | {tf(b):.0f} "
                  f"| {b / a:.2f} | {a_sync:.3f} | {b_sync:.3f} |")
        del q, k, v, do
    # One decode step behind a left-padded KV cache: the case attention.py's docstring sends to SDPA.
    from model import causal_mask
    K, S, D = cfg.gqa_kv_heads, max(cfg.seqs), max(cfg.head_dims)
    q, k, v = _inputs(B, H, K, 1, S, D, torch.bfloat16)
    key_mask = torch.arange(S, device=_device())[None, :] >= torch.arange(B, device=_device())[:, None] * 16
    mask = causal_mask(key_mask, S - 1, 1)
    from model import grouped_sdpa, sdpa_mask
    folded = sdpa_mask(mask, H // K, q.dtype)  # made once per forward by the model, for all its layers
    fns = [lambda: A.flash_attention(q, k, v, mask),
           lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
           lambda: grouped_sdpa(q, k, v, folded)]  # what the model runs in each layer of a decode step
    with torch.no_grad():
        (a, b, c), (a_s, b_s, c_s) = ([kernel_ms(f, cfg.reps, sync_each=sync) for f in fns] for sync in (False, True))
    print(f"| {B} | {H} | {K} | 1 (S={S}) | {D} | decode fwd | {a:.3f} | - | {b:.3f} | - | {b / a:.2f} | {a_s:.3f} "
          f"| {b_s:.3f} |")
    print(f"| {B} | {H} | {K} | 1 (S={S}) | {D} | decode fwd, SDPA with the query heads folded (model.grouped_sdpa) "
          f"in the SDPA columns | {a:.3f} | - | {c:.3f} | - | {c / a:.2f} | {a_s:.3f} | {c_s:.3f} |")
    print(f"\ntotal {time.time() - t0:.0f}s")
    return 0 if all(ok for ok, _ in results) else 1


# -----------------------------------------------------------------------------------------------
# Build report, no GPU needed: python bench_attention.py --build-report


def build_report(arch: int = 90, head_dims=(64, 128)) -> list[dict]:
    """Compile each kernel at its TILES entry (causal, bf16) for an sm_<arch> GPU on a machine without
    one, with Triton's own compiler and the ptxas it ships, and read each binary's resource use with
    the cuobjdump it ships. Spilled registers show up as stack bytes; async copies count the cp.async
    instructions, i.e. whether the loop's loads are pipelined through shared memory. It answers "does it
    still build for Hopper, does it spill, is it pipelined" for an edited kernel before GPU time is spent."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    types = {name: "*bf16" for name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
    types.update(LSE="*fp32", DELTA="*fp32", FIRST="*i32", END="*i32", qk_scale="fp32", sm_scale="fp32")
    kernels = {"fwd": A._fwd_kernel, "dkdv": A._bwd_dkdv_kernel, "dq": A._bwd_dq_kernel}
    rows = []
    jobs = [(kind, D, A.TILES[(kind, max(D, 64))]) for D in head_dims for kind in kernels]
    jobs += [("fwd", D, A.TILES[("fwd", D)][:4] + (v | A.TILES[("fwd", D)][4] & 4,)) for D in head_dims
             for v in (0, 1, 2, 3, 9, 11) if v != A.TILES[("fwd", D)][4] & 11]  # the other loop structures, load paths
    jobs += [("fwd", 64, A.TILES[("fwd", 64)][:4] + (9 | A.TILES[("fwd", 64)][4] & 4, 128))]  # AHEAD, 128 registers
    jobs += [(kind, D, A.TILES[(kind, D)][:4] + (1 | A.variant(A.TILES[(kind, D)]),)) for D in head_dims
             for kind in ("dkdv", "dq") if not A.variant(A.TILES[(kind, D)]) & 1]  # the backward's split loops
    for kind, D, tiles in jobs:
        fn = kernels[kind]
        BM, BN, warps, stages = tiles[:4]
        consts = dict(D=D, CAUSAL=True, BLOCK_M=BM, BLOCK_N=BN)
        arg_types = dict(types)
        if kind == "fwd":
            bits = A.variant(tiles)
            consts.update(SPLIT=bool(bits & 9), TMA=bool(bits & 2), LONGEST_FIRST=bool(bits & 4), AHEAD=bool(bits & 8))
            if consts["TMA"]:  # K and V as tensor descriptors with the tile's block shape
                arg_types.update(K=f"tensordesc<bf16[1,1,{BN},{D}]>", V=f"tensordesc<bf16[1,1,{BN},{D}]>")
        if kind == "dq":
            consts.update(LONGEST_FIRST=bool(A.variant(tiles) & 4))
        if kind != "fwd":
            consts.update(SPLIT=bool(A.variant(tiles) & 1))
        signature = {a: "constexpr" if a in consts else arg_types.get(a, "i32") for a in fn.arg_names}  # rest: i32
        # As a launch at the benchmark's shapes specialises: pointers, strides and sizes divisible by 16
        # (without it the loads are neither vectorised nor pipelined, and the report would describe
        # another program); G, the query heads per kv head, and the float scales are not.
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and a not in ("G", "qk_scale", "sm_scale") and "tensordesc" not in signature[a]}
        t = time.time()
        k = A.triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages,
                                    **({"maxnreg": tiles[5]} if len(tiles) > 5 else {})})
        secs = time.time() - t
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        reg, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
        # loads pipelined through shared memory: cp.async by the warps, or bulk tensor copies (TMA)
        async_copies = len(re.findall(r"cp\.async\.(?:c[ag]|bulk\.tensor)\.", k.asm["ptx"]))
        # Hopper's matrix products (HGMMA) are asynchronous: a product of K = 64 is 4 instructions issued as one
        # group, then waited for. When registers run short, ptxas waits after every instruction instead
        # ("serialized"), and this ratio drops to 1.
        hgmma = re.findall(r"HGMMA\.[^;]*;", sass)
        per_group = len(hgmma) / max(1, sum("gsb0" in h for h in hgmma))
        rows.append(dict(kernel=kind, D=D, tiles=tiles, registers=reg, stack_bytes=stack, async_copies=async_copies,
                         shared_bytes=k.metadata.shared, hgmma_per_group=per_group, compile_s=secs))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="attention.py's Triton flash attention: GPU check, tile sweep and "
                                             "timings against SDPA; or, without a GPU, its build report for sm_90.")
    ap.add_argument("--no-tune", dest="tune", action="store_false", help="skip the tile sweep (use TILES as written)")
    ap.add_argument("--reps", type=int, default=BenchConfig.reps, help="timed calls per figure (median)")
    ap.add_argument("--save-tiles", default="", metavar="FILE",
                    help="write the sweep's chosen tiles to FILE (JSON), for bench.py --attention-tiles FILE")
    ap.add_argument("--small", action="store_true",
                    help="dry run with tiny shapes, on the CPU under TRITON_INTERPRET=1 (what the tests run)")
    ap.add_argument("--build-report", action="store_true",
                    help="no GPU needed: build the kernels for sm_90 and print registers, spills, shared memory")
    args = ap.parse_args(argv)
    if A.triton is None:
        print("error: bench_attention.py needs Triton (pip install triton)", file=sys.stderr)
        return 2
    if args.build_report:
        print(f"triton {A.triton.__version__}, sm_90, causal bf16, tiles from attention.TILES")
        print("| kernel | D | tiles (BLOCK_M, BLOCK_N, warps, stages[, variant[, max registers]]) | registers | stack (spill) bytes "
              "| async copies | shared KB | HGMMA per wait |")
        print("|---|---|---|---|---|---|---|---|")
        for r in build_report():
            print(f"| {r['kernel']} | {r['D']} | {r['tiles']} | {r['registers']} | {r['stack_bytes']} "
                  f"| {r['async_copies']} | {r['shared_bytes'] / 1024:.0f} | {r['hgmma_per_group']:.1f} |")
        return 0
    if args.small:
        if not torch.cuda.is_available() and not A.kernel_runs_on(torch.zeros(1)):
            print("error: --small on a CPU needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        return benchmark(replace(SMALL, tune=args.tune, save_tiles=args.save_tiles))
    if not torch.cuda.is_available():
        print("error: no CUDA GPU: the check and timings need one (--build-report and --small run without)",
              file=sys.stderr)
        return 2
    return benchmark(BenchConfig(reps=args.reps, tune=args.tune, save_tiles=args.save_tiles))


if __name__ == "__main__":
    sys.exit(main())
