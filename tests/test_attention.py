"""attention.py: the Triton flash-attention kernels (run on CPU by Triton's interpreter) against the
plain-math reference, and the reference against PyTorch's SDPA. Shapes are tiny: the interpreter runs
every tile op in numpy."""

import importlib.util
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are jitted, i.e. when attention is imported

import pytest
import torch
import torch.nn.functional as F

import attention
import model

attention = importlib.reload(attention)  # in case it was imported before TRITON_INTERPRET was set: re-jit its kernels
from attention import FlashAttention, flash_attention, padding_bounds, reference_attention
from model import ModelConfig, Transformer, causal_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The interpreter computes in numpy, which warns on an operation that makes a nan (-inf - -inf in a pad row's
# running max, say): no kernel may make one, even in rows whose results are thrown away.
pytestmark = pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning")


def qkv(B, H, K, T, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_() for shape in ((B, H, T, D), (B, K, S, D), (B, K, S, D))]


def key_mask_of(B, S, left=(), right=()):
    """(B, S) bool: row b has left[b] pads at the front and right[b] at the back."""
    m = torch.ones(B, S, dtype=torch.bool)
    for b, n in enumerate(left):
        m[b, :n] = False
    for b, n in enumerate(right):
        if n:
            m[b, S - n:] = False
    return m


def test_interpreter_available():
    import triton
    assert attention.triton is triton and attention.kernel_runs_on(torch.zeros(1))


# ------------------------------------------------------------------------------------------------
# The reference is the formula: it agrees with PyTorch's SDPA (and so with model.py's "sdpa" backend).


@pytest.mark.parametrize("B,H,K,T,S,D,causal,left", [
    (2, 4, 2, 9, 9, 16, True, None),
    (2, 4, 4, 7, 11, 8, False, None),
    (2, 6, 2, 10, 10, 16, True, (0, 4)),  # left padding: the model's mask
    (3, 4, 1, 2, 12, 16, True, (0, 5, 11)),  # decoding behind a cache, T < S
])
def test_reference_matches_sdpa(B, H, K, T, S, D, causal, left):
    q, k, v = qkv(B, H, K, T, S, D, seed=1)
    mask = causal_mask(key_mask_of(B, S, left), S - T, T) if left else None
    ref = reference_attention(q, k, v, mask, causal)
    if mask is None and causal and T != S:
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=H != K)
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)
    if causal:  # model.py's math backend is always causal
        torch.testing.assert_close(ref, model.attention(q, k, v, mask, "math"), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The kernels against the reference: forward and all three gradients.

SPLIT16 = {"fwd": (16, 16, 1, 1, 1), "dkdv": (16, 16, 1, 1), "dq": (16, 16, 1, 1)}
TMA16 = {"fwd": (16, 16, 1, 1, 2), "dkdv": (16, 16, 1, 1), "dq": (16, 16, 1, 1)}
SPLIT_TMA16 = {"fwd": (16, 16, 1, 1, 3), "dkdv": (16, 16, 1, 1), "dq": (16, 16, 1, 1)}
CASES = [
    # B, H, K, T, S, D, causal, left pads, right pads, tiles (BLOCK_M, BLOCK_N, warps, stages) or None
    (1, 2, 2, 13, 13, 16, True, None, None, None),  # one tile, not full
    (2, 4, 2, 37, 37, 32, True, (0, 9), None, None),  # GQA 2 query heads per kv head, 3 tiles, left pads
    (2, 4, 1, 20, 20, 16, True, (3, 17), None, (16, 32, 1, 1)),  # K=1 (multi-query), BLOCK_N > BLOCK_M
    (2, 4, 1, 37, 37, 16, True, (3, 20), (4, 0), (32, 16, 1, 1)),  # left and right pads (PPO's batches)
    (1, 2, 1, 21, 21, 16, False, None, None, None),  # not causal
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, None),  # decoding chunk: T < S, query i at slot S - T + i
    (2, 2, 1, 1, 19, 32, True, (0, 18), None, None),  # one decode step; row 1 has a single real key
    (1, 2, 2, 16, 32, 16, False, None, None, None),  # not causal, T < S, whole tiles
    # The GPU's tile sizes, several tiles per row: every unmasked middle range is exercised.
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (128, 64, 4, 3), "dkdv": (64, 128, 8, 2), "dq": (64, 64, 4, 3)}),
    (1, 2, 1, 70, 300, 16, True, (130,), None, (64, 128, 4, 2)),
    # The forward's split loops (SPLIT=1): the unmasked run, then the edge tiles left and right of it.
    (2, 4, 2, 37, 37, 32, True, (0, 9), None, SPLIT16),  # left pads: one tile left of the run
    (2, 4, 1, 37, 37, 16, True, (3, 20), (4, 0), SPLIT16),  # and right pads
    (1, 2, 1, 40, 40, 16, True, (37,), None, {"fwd": (16, 32, 1, 1, 1), "dkdv": (16, 16, 1, 1), "dq": (16, 16, 1, 1)}),
    (1, 2, 1, 21, 21, 16, False, None, None, SPLIT16),  # not causal
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, SPLIT16),  # T < S
    (2, 2, 1, 1, 19, 32, True, (0, 18), None, SPLIT16),  # one decode step, a row with one real key
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (128, 64, 4, 3, 1), "dkdv": (64, 128, 8, 2), "dq": (64, 64, 4, 3)}),
    # K/V through tensor descriptors (TMA), one loop (variant 2) and split loops (3): keys past S read as 0,
    # keys in [end, S) masked as edges.
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), TMA16),
    (2, 4, 1, 37, 37, 16, True, (3, 20), (4, 0), SPLIT_TMA16),
    (1, 2, 1, 21, 21, 16, False, None, None, SPLIT_TMA16),
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, TMA16),
    (2, 2, 1, 1, 19, 32, True, (0, 18), None, SPLIT_TMA16),
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (128, 64, 4, 3, 3), "dkdv": (64, 128, 8, 2), "dq": (64, 64, 4, 3)}),
    # Query tiles last to first (LONGEST_FIRST, bit 4), with each loop structure and load path; ignored if not causal.
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), {**SPLIT16, "fwd": (16, 16, 1, 1, 4)}),
    (2, 4, 1, 37, 37, 16, True, (3, 20), (4, 0), {**SPLIT16, "fwd": (16, 16, 1, 1, 5)}),
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, {**SPLIT16, "fwd": (16, 16, 1, 1, 6)}),
    (1, 2, 1, 21, 21, 16, False, None, None, {**SPLIT16, "fwd": (16, 16, 1, 1, 7)}),
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (128, 64, 4, 3, 7), "dkdv": (64, 128, 8, 2), "dq": (64, 64, 4, 3)}),
    # The split loops' main loop with each tile's scores a tile ahead of its softmax (AHEAD, bit 8): several
    # visible tiles, exactly one (the loop body never runs: prologue and epilogue only), none (query tile 0),
    # with TMA, longest first, not causal, T < S, one decode step, and the GPU's tile sizes.
    (2, 4, 1, 37, 37, 16, True, (3, 20), (4, 0), {**SPLIT16, "fwd": (16, 16, 1, 1, 9)}),
    (1, 2, 1, 32, 32, 16, True, None, None, {**SPLIT16, "fwd": (16, 16, 1, 1, 8)}),
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), {**SPLIT16, "fwd": (16, 16, 1, 1, 11)}),
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), {**SPLIT16, "fwd": (16, 16, 1, 1, 13)}),
    (1, 2, 1, 21, 21, 16, False, None, None, {**SPLIT16, "fwd": (16, 16, 1, 1, 15)}),
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, {**SPLIT16, "fwd": (16, 16, 1, 1, 9)}),
    (2, 2, 1, 1, 19, 32, True, (0, 18), None, {**SPLIT16, "fwd": (16, 16, 1, 1, 11)}),
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (64, 64, 4, 3, 9), "dkdv": (64, 128, 8, 2), "dq": (64, 64, 4, 3)}),
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), {**SPLIT16, "fwd": (16, 16, 1, 1, 13, 128)}),  # a register cap
    # The backward kernels' split loops (the 5th field of their tiles, bit 1): a loop over the tiles that need
    # no bounds and no mask, then the edge tiles; dQ also longest first (5). Padding left and right, GQA, not
    # causal, T < S, one decode step, the GPU's tile sizes.
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), {**SPLIT16, "dkdv": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 1)}),
    (2, 4, 1, 37, 37, 16, True, (3, 20), (4, 0), {**SPLIT16, "dkdv": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 5)}),
    (1, 2, 1, 40, 40, 16, True, (37,), None, {**SPLIT16, "dkdv": (16, 32, 1, 1, 1), "dq": (32, 16, 1, 1, 1)}),
    (1, 2, 1, 21, 21, 16, False, None, None, {**SPLIT16, "dkdv": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 1)}),
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, {**SPLIT16, "dkdv": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 5)}),
    (2, 2, 1, 1, 19, 32, True, (0, 18), None, {**SPLIT16, "dkdv": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 1)}),
    (1, 2, 2, 16, 32, 16, False, None, None, {**SPLIT16, "dkdv": (16, 16, 1, 1, 1), "dq": (16, 16, 1, 1, 1)}),
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (128, 64, 4, 3, 9), "dkdv": (64, 128, 8, 2, 1), "dq": (64, 64, 4, 3, 1)}),
    # dQ's query tiles last to first too (its 5th field, 4), with padding, T < S, and several tiles per row.
    (2, 4, 2, 37, 37, 32, True, (0, 9), (0, 5), {**SPLIT16, "dq": (16, 16, 1, 1, 4)}),
    (2, 4, 2, 3, 20, 16, True, (2, 5), None, {**SPLIT16, "dq": (16, 16, 1, 1, 4)}),
    (2, 4, 2, 300, 300, 16, True, (0, 70), (0, 9),
     {"fwd": (128, 64, 4, 3, 5), "dkdv": (64, 128, 8, 2), "dq": (64, 64, 4, 3, 4)}),
]


@pytest.mark.parametrize("B,H,K,T,S,D,causal,left,right,tiles", CASES)
def test_flash_matches_reference(B, H, K, T, S, D, causal, left, right, tiles):
    q, k, v = qkv(B, H, K, T, S, D, seed=T * 100 + S)
    key_mask = key_mask_of(B, S, left or (), right or ())
    mask = causal_mask(key_mask, S - T, T) if (left or right) else None
    real = key_mask[:, S - T:][:, None, :, None]  # (B, 1, T, 1): query rows at real slots
    if tiles is None:
        out = flash_attention(q, k, v, mask, causal)
    else:
        first, end = padding_bounds(mask, T, S) if mask is not None else attention.no_padding(B, S, q.device)
        out = FlashAttention.apply(q, k, v, first, end, causal, tiles)
    assert out.stride(1) == D and out.stride(2) == H * D, "not the kernel's output (laid out (B, T, H, D))"
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)

    ref = reference_attention(q, k, v, mask, causal)
    # Pad rows are 0 in ours, so their upstream gradient must not reach the reference's inputs either.
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), do * real)
    torch.testing.assert_close(out * real, ref * real, atol=1e-4, rtol=1e-4)
    assert torch.equal(out * ~real, torch.zeros_like(out)), "pad query rows must be exactly 0"
    for ours, theirs, name in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        assert torch.isfinite(ours).all(), name
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert torch.equal(dq * ~real, torch.zeros_like(dq)), "pad query rows get no gradient"
    if left and max(left) > 0:  # keys that are left padding are seen by no real query: zero gradient
        pad_keys = ~key_mask[:, None, :, None]
        assert torch.equal(dk * pad_keys, torch.zeros_like(dk)) and torch.equal(dv * pad_keys, torch.zeros_like(dv))


def test_gradient_through_expanded_upstream():
    """out.sum().backward() hands the backward a stride-0 gradient; the wrapper must cope."""
    q, k, v = qkv(1, 2, 1, 17, 17, 16, seed=3)
    flash_attention(q, k, v).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference_attention(q2, k2, v2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The mask: read once into first/end, anything else goes to the fallback.


def test_padding_bounds_reads_the_model_mask():
    S = 12
    key_mask = key_mask_of(4, S, left=(0, 3, 11, 0), right=(0, 2, 0, 5))
    for T in (S, 4, 1):
        first, end = padding_bounds(causal_mask(key_mask, S - T, T), T, S)
        assert first.tolist() == [0, 3, 11, 0] and end.tolist() == [12, 10, 12, 7]
        assert first.dtype == end.dtype == torch.int32
    # A single trailing pad is indistinguishable from a real last key in this mask; either reading is exact.
    first, end = padding_bounds(causal_mask(key_mask_of(1, S, right=(1,)), 0, S), S, S)
    assert (first.item(), end.item()) == (0, S)


def test_padding_bounds_rejects_other_masks():
    T = S = 10
    good = causal_mask(key_mask_of(2, S, left=(0, 3)), 0, T)
    bad = good.clone()
    bad[1, 0, 7, 5] = False  # a hole inside a row
    assert padding_bounds(good, T, S) is not None
    assert padding_bounds(bad, T, S) is None
    assert padding_bounds(good.float(), T, S) is None  # additive float masks are not this form
    holes = key_mask_of(2, S, left=(0, 3))
    holes[0, 4] = False  # a pad in the middle of the row: not left/right padding
    assert padding_bounds(causal_mask(holes, 0, T), T, S) is None


def test_other_masks_fall_back_to_the_reference():
    B, H, K, T, S, D = 2, 2, 1, 9, 9, 16
    q, k, v = qkv(B, H, K, T, S, D, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = (torch.rand(B, 1, T, S, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)
    torch.testing.assert_close(flash_attention(q, k, v, mask), reference_attention(q, k, v, mask), atol=0, rtol=0)


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    B, H, K, T, S, D = 2, 2, 1, 6, 6, 16
    q, k, v = qkv(B, H, K, T, S, D, seed=8)
    mask = causal_mask(key_mask_of(B, S, left=(0, 2)), 0, T)
    monkeypatch.delenv("TRITON_INTERPRET")
    out = flash_attention(q, k, v, mask)
    # The reference keeps the model mask's pad rows (each attends to itself), which the kernel zeroes.
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), atol=0, rtol=0)
    assert out[1, :, 0].abs().sum() > 0


def test_bad_shapes():
    q, k, v = qkv(1, 3, 2, 4, 4, 16, seed=9)
    with pytest.raises(ValueError, match="multiple of K"):
        flash_attention(q, k, v)
    q, k, v = qkv(1, 2, 2, 5, 4, 16, seed=9)
    with pytest.raises(ValueError, match="T <= S"):
        flash_attention(q, k, v)


def test_import_without_triton(monkeypatch):
    """A machine without Triton still imports attention.py and gets the reference."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("attention_no_triton", os.path.join(ROOT, "attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.triton is None
    q, k, v = qkv(1, 2, 1, 5, 5, 16, seed=10)
    torch.testing.assert_close(mod.flash_attention(q, k, v), reference_attention(q, k, v), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Inside the model: the "triton" backend gives the "math" backend's logits, gradients and samples.


def tiny_pair():
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = Transformer(cfg, attn="math")
    ours = Transformer(cfg, attn="math")
    ours.load_state_dict(ref.state_dict())
    ours.attn = "triton"  # pick_attention_backend would refuse without CUDA; the interpreter runs it here
    return ref, ours


def test_model_forward_and_backward_match_math_backend():
    ref, ours = tiny_pair()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(11))
    am = key_mask_of(2, 11, left=(0, 4)).long()
    real = am.bool()[..., None]
    outs = []
    for m in (ref, ours):
        logits = m(ids, attention_mask=am)
        (logits * real).square().mean().backward()
        outs.append((logits, m.model.layers[0].self_attn.qkv_proj.weight.grad, m.model.embed_tokens.weight.grad))
    torch.testing.assert_close(outs[1][0] * real, outs[0][0] * real, atol=1e-4, rtol=1e-4)
    for a, b in zip(outs[1][1:], outs[0][1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_model_generate_matches_math_backend():
    ref, ours = tiny_pair()
    prompts = [[5, 9, 2, 7, 1], [3, 8]]
    a = model.generate(ref, prompts, 3, temperature=0)
    b = model.generate(ours, prompts, 3, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)


def test_kernels_build_for_hopper_and_the_forward_does_not_spill():
    # Compiles for sm_90 with Triton's own ptxas (no GPU): a kernel edit that no longer builds for the H100/H200,
    # spills in the forward, or loses the pipelined loads fails here instead of on a lent GPU. Run without
    # TRITON_INTERPRET, which replaces the jitted kernels.
    import re
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench_attention.py"), "--build-report"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = re.findall(r"^\| (fwd|dkdv|dq) \| (\d+) \| \((.*?)\) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$",
                      r.stdout, re.M)
    built = sorted((k, int(d), len(t.split(","))) for k, d, t, *_ in rows)
    variants = [("fwd", d, 5) for d in (64, 128)] * 6  # the forward's loop structures and load paths: 0-3, 9, 11
    variants += [("fwd", 64, 6)]  # and AHEAD capped at 128 registers (two 8-warp programs per SM)
    variants += [(k, d, 5) for k in ("dkdv", "dq") for d in (64, 128)]  # the backward kernels' split loops
    assert built == sorted([(k, d, 4) for k in ("dkdv", "dq") for d in (64, 128)] + variants), built
    for i, (kernel, D, tiles, regs, stack, copies, shared_kb, per_wait) in enumerate(rows):
        assert 0 < int(regs) <= 255 and 0 < int(shared_kb) <= 227, (kernel, D, regs, shared_kb)  # sm_90 limits
        assert int(copies) > 0, f"{kernel} D={D} {tiles}: no pipelined (cp.async) loads"
        if kernel == "fwd" and len(tiles.split(",")) == 5:  # (the capped build may spill a little: it is timed)
            assert int(stack) == 0, f"the forward kernel spills at D={D} {tiles}: {stack} bytes"
        if len(tiles.split(",")) == 6:
            assert int(regs) <= 128 and int(stack) <= 256, (tiles, regs, stack)
        if i < 6:  # the TILES entries, what runs by default: products issued in groups, not waited one by one
            assert float(per_wait) >= 4, f"{kernel} D={D} {tiles}: serialised wgmma ({per_wait} HGMMA per wait)"


def test_the_gpu_check_fails_a_wrong_kernel(monkeypatch):
    # bench_attention.check() is what the GPU check runs before timing (every forward variant passing it
    # is in the dry run below); here a kernel 5% off must fail it.
    import bench_attention
    real = attention._flash_forward
    monkeypatch.setattr(attention, "_flash_forward", lambda *a: (lambda o, lse: (o * 1.05, lse))(*real(*a)))
    ok, msg = bench_attention.check(1, 2, 1, 20, 20, 16, True, torch.float32, tiles=SPLIT16)
    assert not ok and msg.endswith("FAIL"), msg


def test_the_sweep_never_chooses_a_wrong_candidate(monkeypatch, capsys):
    # The sweep compares each candidate with SDPA before timing it: here every forward variant with split
    # loops (bit 1) is made 5% off, so however fast, none of them may be timed or chosen.
    import bench_attention
    monkeypatch.setattr(attention, "TILES", dict(attention.TILES))
    real = attention._flash_forward

    def off_when_split(q, k, v, first, end, causal, tiles=None):
        o, lse = real(q, k, v, first, end, causal, tiles)
        return (o * 1.05, lse) if tiles is not None and tiles["fwd"][4] & 1 else (o, lse)

    monkeypatch.setattr(attention, "_flash_forward", off_when_split)
    bench_attention.tune(bench_attention.SMALL)
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipped (relative error" in line]
    assert len(skipped) == sum(v & 1 for v in bench_attention.FWD_VARIANTS) == 8, out
    chosen = attention.TILES[("fwd", 16)]
    assert not chosen[4] & 1 and f"-> chosen {chosen}" in out, out


def test_tiles_saved_by_the_sweep_load_into_another_process(tmp_path, monkeypatch, capsys):
    # make bench-gpu: bench_attention.py --save-tiles FILE, then bench.py --attention-tiles FILE.
    import bench
    monkeypatch.setattr(attention, "TILES", dict(attention.TILES))
    path = str(tmp_path / "tiles.json")
    attention.TILES[("fwd", 64)] = (64, 64, 4, 2, 9, 128)
    attention.save_tiles(path)
    saved = dict(attention.TILES)
    attention.TILES.clear()
    assert attention.load_tiles(path) == saved and attention.TILES == saved
    bad = tmp_path / "bad.json"
    for text in ('[["fwd", 64, [128, 64, 8]]]', '[["bwd", 64, [64, 64, 4, 2]]]', "{oops"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.json"):
            attention.load_tiles(str(bad))
        assert attention.TILES == saved  # unchanged by a file it refused
    capsys.readouterr()
    assert bench.main(["--small", "--sections", "3", "--attention-tiles", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --attention-tiles") and "bad.json" in err and "\n" not in err, err
    attention.TILES.clear()
    monkeypatch.delenv("TRITON_INTERPRET")  # (section 3 through the reference: the tiles are what is checked here)
    assert bench.main(["--small", "--sections", "3", "--attention-tiles", path]) == 0
    assert f"attention tiles from {path}" in capsys.readouterr().out and attention.TILES == saved


def test_the_gpu_check_without_a_gpu_says_so_in_one_line(capsys):
    import bench_attention
    assert bench_attention.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA GPU") and "\n" not in err, err


def test_the_whole_gpu_script_runs_as_a_dry_run_on_the_cpu(monkeypatch, capsys, tmp_path):
    # --small runs every line of bench_attention.py (sweep, checks, both timing modes, the decode row) under
    # the interpreter, so a slip in the script shows here and not on a lent GPU. Its timings mean nothing.
    import bench_attention
    monkeypatch.setattr(attention, "TILES", dict(attention.TILES))  # the sweep writes its winners into TILES
    assert bench_attention.main(["--small", "--save-tiles", str(tmp_path / "tiles.json")]) == 0
    out = capsys.readouterr().out
    checks = [line for line in out.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(checks) == 19 and all(line.endswith("PASS") for line in checks), out
    assert all(f"forward variant {v}, dK/dV 0, dQ 0:" in out for v in bench_attention.FWD_VARIANTS), out
    assert all(f"dK/dV {a}, dQ {b}:" in out for a, b in ((1, 1), (1, 5), (0, 4))), out
    assert len(bench_attention.FWD_VARIANTS) == 12 and 13 in bench_attention.FWD_VARIANTS
    rows = [line for line in out.splitlines() if line.startswith("| 1 | 4 |")]
    assert len(rows) == 6 and all(line.count("|") == 14 for line in rows), out  # 13 columns each
    assert ("fwd", 16) in attention.TILES and "chosen" in out
    chosen = dict(attention.TILES)
    attention.TILES.clear()
    assert attention.load_tiles(str(tmp_path / "tiles.json")) == chosen  # the sweep's winners, saved
    assert out.count("candidates on") == 3 and "parallel compile skipped" not in out, out  # one per kernel
    assert all("run" not in kernel.__dict__ for kernel in (attention._fwd_kernel, attention._bwd_dq_kernel)), \
        "the compile-only launch was left in place"
