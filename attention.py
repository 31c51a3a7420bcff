"""
Flash attention in Triton (fused forward and backward), and the plain-math attention it is checked against.

    python attention.py --bench           # on a CUDA GPU: correctness, tile sweep, timings against SDPA
    python attention.py --build-report    # anywhere: build for sm_90, print registers / spills / shared memory

What it computes. softmax(Q K^T / sqrt(D) + mask) V for q (B, H, T, D) and k, v (B, K, S, D), H a
multiple of K (grouped-query attention: query head h reads kv head h // (H/K)). Query row i sits at
sequence slot start + i with start = S - T (T < S when decoding behind a KV cache). Each batch row b
has real keys in the slots [first[b], end[b]); slots before are left padding, slots after are right
padding. A real query attends the real keys at or before its own slot (all real keys if not causal).
A pad query (its slot outside [first, end)) gets output 0 and gradient 0: it is never used, and a row
of zeros cannot leak NaN/inf into anything.

The forward (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023). One program owns a tile of
BLOCK_M query rows of one head, keeps it in registers and streams the K/V tiles of BLOCK_N keys past
it. For each key tile it computes the scores s = q k^T, and updates an online softmax: the running
row max m, the running sum l of exp(s - m) and the running output acc = sum exp(s - m) v; when the
max grows, l and acc are rescaled by exp(m_old - m_new). At the end out = acc / l. The T x S score
matrix never exists in memory; what is saved for the backward is one number per row, the log-sum-exp
lse = m + log(l). We work in base 2 (exp2 is one instruction; the scale absorbs log2(e)).

Only key tiles that straddle a boundary (the causal diagonal, the first real key, the end of the keys)
need the visibility mask; `_key_ranges` finds the fully visible run of tiles in between, which skip it.
The forward comes in four variants, picked by the 5th field of its tiles (bits SPLIT and TMA). SPLIT:
one loop over every tile with a branch on the tile index (0), or a branch-free loop over the fully
visible tiles followed by a loop over the few edge tiles (1), whose main loop has no branch, no load
bounds and no mask. TMA: K/V tiles loaded by the program's own warps through cp.async (0), or fetched
by Hopper's bulk tensor copy engine from host-made tensor descriptors (1), which frees those warps and
registers for the softmax. All four build for sm_90 without spilling (`--build-report`); which is
fastest is the GPU sweep's to say.
(Three loops, edge / middle / edge, spilled registers when built for sm_90 with Triton 3.9.)

The backward recomputes the probabilities from the saved lse (p = exp2(s - lse)) instead of storing
them, and uses delta = rowsum(dO * O) (so dS = P * (dP - delta), the softmax Jacobian). Two kernels:
  - dK/dV: one program per (key tile, kv head). It loops over the H/K query heads of its group and over
    their query tiles, accumulating dK and dV in registers, and writes them once. Summing the group
    inside the kernel needs no (B, H, S, D) fp32 buffer, no second reduction pass and no atomics (so the
    result is deterministic); the price is K instead of H programs per key tile, which only matters when
    B * K * S / BLOCK_N is smaller than the number of SMs.
  - dQ: one program per (query tile, head), streaming key tiles like the forward.
Pad rows store lse = +inf, so the recomputed p = exp2(s - inf) is exactly 0 there: the backward needs
no row mask at all, only the key visibility mask on edge tiles.

The mask. model.py passes None (plain causal, T == S) or the boolean (B, 1, T, S) mask of
model.causal_mask. The kernel reads no T x S mask: `padding_bounds` turns it, once per forward (the
same mask tensor serves every layer), into first/end per row and checks that rebuilding the mask
from them gives the same tensor. Any other mask goes to the fallback (SDPA on CUDA, the reference on
CPU), so results never silently change.

Decoding (T = 1 behind the KV cache): use SDPA, not this kernel. A query tile has at least 16 rows
(the tensor-core minimum) and is tuned at 64-128, so at T = 1 all but one row of every tile is wasted
work, and there are only B * H programs, each streaming all S keys alone: on a large GPU with small B
most SMs idle. SDPA (or a split-K "flash-decoding" kernel, which splits S across programs and merges
the partial softmaxes) is the right tool there; `benchmark()` times one decode step of both.
The kernel is still correct at T = 1 (the tests run it), so nothing breaks if it is called.

Where it runs. On CUDA fp16/bf16 tensors (or under bf16/fp16 autocast) when Triton is installed. On
CPU fp32 tensors only under TRITON_INTERPRET=1 (Triton's interpreter, used by the tests; set it before
triton is imported). Everything else gets SDPA (CUDA) or the math reference (CPU). Importing this file
never needs Triton.
"""

import argparse
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and the fallback need no Triton; the kernels below are never launched
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language so the kernel signatures below still parse
        constexpr = None

try:  # host-side TMA descriptors (recent Triton); without them the TMA variants use the warps' loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
jit = triton.jit if triton is not None else (lambda fn: fn)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

# Tile sizes per (kernel, head_dim): (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages), and for the
# forward a 5th field, its variant: SPLIT + 2 * TMA (see the module docstring); head dims below 64 use the 64
# row. The fastest of TUNE_CANDIDATES in `benchmark()`'s sweep on one H100 (B8 H32 T2048 causal bf16, Triton
# 3.6, when only variant 0 existed; docs/PERFORMANCE.md); `benchmark()` sweeps again and overwrites these.
TILES = {
    ("fwd", 64): (128, 64, 8, 3, 0), ("fwd", 128): (128, 64, 8, 3, 0),
    ("dkdv", 64): (64, 64, 4, 3), ("dkdv", 128): (64, 128, 8, 2),
    ("dq", 64): (64, 64, 4, 2), ("dq", 128): (128, 128, 8, 2),
}
INTERPRET_TILES = (16, 16, 1, 1)  # under the CPU interpreter: the smallest tile tl.dot accepts
HEAD_DIMS = (16, 32, 64, 128)  # powers of two (tl.arange); 16 is tl.dot's minimum


# -----------------------------------------------------------------------------------------------
# The reference: the formula itself, in fp32.


def reference_attention(q, k, v, mask=None, causal=True):
    """softmax(q k^T / sqrt(D) + mask) v in fp32, returned in q's dtype. q (B, H, T, D), k/v (B, K, S, D);
    mask (B, 1, T, S) bool (True = may attend), or None: causal with query i at slot S - T + i, or full
    attention if not causal. The same math as model.attention(backend="math") and as SDPA."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    qg = q.float().view(B, K, H // K, T, D)  # (B, K, G, T, D): the G query heads sharing one kv head
    scores = qg @ k.float().unsqueeze(2).transpose(-1, -2) / math.sqrt(D)  # (B, K, G, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))  # (B, 1, 1, T, S)
    elif causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), float("-inf"))
    out = scores.softmax(-1) @ v.float().unsqueeze(2)  # (B, K, G, T, D)
    return out.reshape(B, H, T, D).to(q.dtype)


# -----------------------------------------------------------------------------------------------
# Forward kernel


@jit
def _visible(slot, key, first, end, CAUSAL: tl.constexpr):
    """Which (query, key) pairs may attend, for broadcast slot and key index blocks: the key is real and,
    if causal, not after the query's slot."""
    ok = (key >= first) & (key < end)
    if CAUSAL:
        ok = ok & (key <= slot)
    return ok


@jit
def _key_ranges(first, end, slot0, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for the query tile whose first row sits at slot0. [lo, hi): every key a row of the tile
    may see (real, and at or before the tile's last slot if causal). [full_lo, full_hi): tiles whose keys
    are all real and, if causal, at or before slot0, so every row sees all of them: no mask needed."""
    lo = (first // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(first, BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(end, slot0 + BLOCK_M)
        full_hi = (tl.minimum(end, slot0 + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = end
        full_hi = (end // BLOCK_N) * BLOCK_N
    return lo, hi, full_lo, tl.maximum(full_hi, full_lo)


@jit
def _fwd_tile(q, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale, m_i, l_i, acc, edge,
              CHECK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Fold the key tile starting at n0 into the online softmax (m_i, l_i, acc). CHECK=False: the caller
    knows every key of the tile is real and visible to every row, so no load bound and no mask. CHECK=True:
    loads stop at `end`, and the visibility mask is applied where `edge` (a tile on the diagonal or the
    padding edge). TMA: k_base / v_base are tensor descriptors of K / V (B, K, S, D) and the tile is one
    bulk copy; keys past S read as 0 and keys in [end, S) are masked like any other edge."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    # (Tile pointers are built here from the scalar base: a pointer block kept across the loop costs registers.)
    if TMA:
        k = k_base.load([b.to(tl.int32), kvh, n0, 0]).reshape(BLOCK_N, D)  # descriptor coordinates are int32
        v = v_base.load([b.to(tl.int32), kvh, n0, 0]).reshape(BLOCK_N, D)
    elif CHECK:
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=(offs_n < end)[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=(offs_n < end)[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :])
    s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) raw scores q.k; times qk_scale they are in log2 units
    if CHECK:
        if edge:
            s = tl.where(_visible(slot[:, None], offs_n[None, :], first, end, CAUSAL), s, float("-inf"))
    # The scale goes on the row max (qk_scale > 0 keeps the argmax) and into one multiply-add per score below,
    # rather than a separate multiply of every score first: the softmax arithmetic is what bounds this loop.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: avoid -inf - -inf
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # the product accumulates into acc (in place on Hopper)
    return m_new, l_i, acc


@jit
def _fwd_kernel(Q, K, V, O, LSE, FIRST, END, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
                H, G, T, S, qk_scale, D: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr):
    # TMA: K and V arrive as tensor descriptors (B, K, S, D) with (1, 1, BLOCK_N, D) blocks, not pointers.
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    kvh = h // G  # grouped-query attention: read the shared kv head, never a repeated copy
    start = S - T  # slot of query row 0
    first, end = tl.load(FIRST + b), tl.load(END + b)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    slot = start + offs_m
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=(offs_m < T)[:, None], other=0.0)
    if TMA:
        k_base, v_base = K, V
    else:
        k_base, v_base = K + b * skb + kvh * skh, V + b * svb + kvh * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of each row's scores (log2 units)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, D), tl.float32)  # running sum of exp2(score - m_i) * v
    lo, hi, full_lo, full_hi = _key_ranges(first, end, start + m0, CAUSAL, BLOCK_M, BLOCK_N)
    if SPLIT:
        for n0 in range(full_lo, full_hi, BLOCK_N):  # the fully visible tiles: no bounds, no mask, no branch
            m_i, l_i, acc = _fwd_tile(q, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale,
                                      m_i, l_i, acc, False, False, CAUSAL, BLOCK_N, D, TMA)
        # The edge tiles: at most one left of the run ([lo, full_lo), the padding edge) and the ones right of
        # it ([full_hi, hi), the diagonal or the end of the keys). The softmax does not care about the order.
        n_left = tl.cdiv(tl.maximum(tl.minimum(full_lo, hi) - lo, 0), BLOCK_N)
        n_edge = n_left + tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_N)
        for i in range(0, n_edge):
            n0 = tl.where(i < n_left, lo + i * BLOCK_N, full_hi + (i - n_left) * BLOCK_N)
            m_i, l_i, acc = _fwd_tile(q, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale,
                                      m_i, l_i, acc, True, True, CAUSAL, BLOCK_N, D, TMA)
    else:
        for n0 in range(lo, hi, BLOCK_N):  # every tile, the mask only where the tile is on an edge
            m_i, l_i, acc = _fwd_tile(q, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale,
                                      m_i, l_i, acc, (n0 < full_lo) | (n0 >= full_hi), True, CAUSAL, BLOCK_N, D, TMA)

    real = (slot >= first) & (slot < end)  # pad rows: output 0, lse +inf (so the backward's p is 0)
    l_safe = tl.where(real, l_i, 1.0)
    out = tl.where(real[:, None], acc / l_safe[:, None], 0.0)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < T)[:, None])
    tl.store(LSE + bh * T + offs_m, tl.where(real, m_i + tl.log2(l_safe), float("inf")), mask=offs_m < T)


# -----------------------------------------------------------------------------------------------
# Backward kernels


@jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) (B, H, T) in fp32: the softmax Jacobian's correction term."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    inb = (offs_m < T)[:, None]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=inb, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=inb, other=0.0)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < T)


@jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, FIRST, END, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                     sdb, sdh, sdt, sdkb, sdkh, sdks, sdvb, sdvh, sdvs, H, G, T, S, sm_scale, qk_scale,
                     D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bk = tl.program_id(1)
    KH = H // G
    b, kvh = (bk // KH).to(tl.int64), bk % KH
    start = S - T
    first, end = tl.load(FIRST + b), tl.load(END + b)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    key_in = (offs_n < S)[:, None]
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=key_in, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], mask=key_in, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    # Query rows [r_lo, r_hi) may see a key of this tile: real (slot in [first, end)) and, if causal, slot >= n0.
    r_lo = tl.maximum(first - start, 0)
    if CAUSAL:
        r_lo = tl.maximum(r_lo, n0 - start)
    r_hi = tl.minimum(end - start, T)
    r_hi = tl.where((n0 + BLOCK_N > first) & (n0 < end), r_hi, 0)  # a tile of pad keys: nothing to do
    lo = (r_lo // BLOCK_M) * BLOCK_M
    # Query tiles [full_lo, full_hi) see every key of this tile: all its keys real, and (if causal) the
    # tile's first slot at or past its last key. The others need the mask.
    f_lo = r_lo
    if CAUSAL:
        f_lo = tl.maximum(r_lo, n0 + BLOCK_N - 1 - start)
    full_lo = tl.cdiv(f_lo, BLOCK_M) * BLOCK_M
    full_hi = tl.maximum((r_hi // BLOCK_M) * BLOCK_M, full_lo)
    keys_real = (n0 >= first) & (n0 + BLOCK_N <= end)
    full_lo, full_hi = tl.where(keys_real, full_lo, lo), tl.where(keys_real, full_hi, lo)
    for g in range(0, G):  # the query heads that share this kv head: their gradients sum here
        h = kvh * G + g
        q_base, do_base = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
        lse_base, delta_base = LSE + (b * H + h) * T, DELTA + (b * H + h) * T
        for m0 in range(lo, r_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            inb = offs_m < T
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=inb[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :], mask=inb[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=inb, other=float("inf"))  # +inf: out of range, p = 0
            delta = tl.load(delta_base + offs_m, mask=inb, other=0.0)
            sT = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): scores kept transposed, keys x queries
            if (m0 < full_lo) | (m0 >= full_hi):
                sT = tl.where(_visible(start + offs_m[None, :], offs_n[:, None], first, end, CAUSAL), sT, float("-inf"))
            pT = tl.exp2(sT - lse[None, :])  # the probabilities, recomputed
            dv = tl.dot(pT.to(do.dtype), do, dv)  # accumulate in the product, not by a separate add
            dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk)
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=key_in)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_in)


@jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, FIRST, END, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                   sdb, sdh, sdt, sdqb, sdqh, sdqt, H, G, T, S, sm_scale, qk_scale, D: tl.constexpr,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    kvh = h // G
    start = S - T
    first, end = tl.load(FIRST + b), tl.load(END + b)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    inb = offs_m < T
    slot = start + offs_m
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=inb[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=inb[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=inb, other=float("inf"))  # +inf: pad or out-of-range row, p = 0
    delta = tl.load(DELTA + bh * T + offs_m, mask=inb, other=0.0)
    k_base, v_base = K + b * skb + kvh * skh, V + b * svb + kvh * svh
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    lo, hi, full_lo, full_hi = _key_ranges(first, end, start + m0, CAUSAL, BLOCK_M, BLOCK_N)  # as the forward
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=(offs_n < end)[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=(offs_n < end)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if (n0 < full_lo) | (n0 >= full_hi):
            s = tl.where(_visible(slot[:, None], offs_n[None, :], first, end, CAUSAL), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=inb[:, None])


# -----------------------------------------------------------------------------------------------
# Launchers and the autograd Function

FILL_NAN = False  # benchmark(): allocate every output NaN-filled, to prove that the kernels write all of it


def _empty(*shape, like, dtype=None):
    t = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    return t.fill_(float("nan")) if FILL_NAN else t


def _empty_like(x):
    t = torch.empty_like(x)
    return t.fill_(float("nan")) if FILL_NAN else t


def _tiles(kind, D, x, tiles):
    if tiles is not None:
        return tiles[kind] if isinstance(tiles, dict) else tiles
    return INTERPRET_TILES if not x.is_cuda else TILES[(kind, max(D, 64))]


def _tma_aligned(t) -> bool:
    return t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])


def _flash_forward(q, k, v, first, end, causal, tiles=None):
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    cfg = _tiles("fwd", D, q, tiles)
    BM, BN, warps, stages = cfg[:4]
    variant = cfg[4] if len(cfg) > 4 else 0  # the forward's 5th field: bit 0 SPLIT, bit 1 TMA (see TILES)
    kk, vv = k, v
    if variant & 2 and (TensorDescriptor is None or not all(_tma_aligned(t) for t in (k, v))):
        variant &= 1  # the copy engine needs descriptors and 16-byte aligned bases and strides; the warps' loads do not
    if variant & 2:  # K/V tiles by the bulk tensor copy engine: host-side descriptors with the tile's block shape
        kk, vv = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, BN, D]) for t in (k, v))
    # Output laid out (B, T, H, D) in memory and returned as a (B, H, T, D) view, so the model's
    # transpose(1, 2).reshape(B, T, H * D) that follows is free.
    o = _empty(B, T, H, D, like=q).transpose(1, 2)
    lse = _empty(B, H, T, like=q, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(T, BM), B * H)](
        q, kk, vv, o, lse, first, end, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, H // K, T, S, LOG2E / math.sqrt(D), D=D, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        SPLIT=bool(variant & 1), TMA=bool(variant & 2), num_warps=warps, num_stages=stages)
    return o, lse


def _flash_backward(do, q, k, v, o, lse, first, end, causal, tiles=None):
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()  # e.g. the expanded ones of out.sum().backward()
    sm_scale = 1.0 / math.sqrt(D)
    delta = _empty(B, H, T, like=q, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                                   D=D, BLOCK_M=64)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)  # same memory layout as the inputs
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    BM, BN, warps, stages = _tiles("dkdv", D, q, tiles)
    _bwd_dkdv_kernel[(triton.cdiv(S, BN), B * K)](
        q, k, v, do, lse, delta, dk, dv, first, end, *strides, *dk.stride()[:3], *dv.stride()[:3],
        H, H // K, T, S, sm_scale, sm_scale * LOG2E, D=D, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _tiles("dq", D, q, tiles)
    _bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](
        q, k, v, do, lse, delta, dq, first, end, *strides, *dq.stride()[:3],
        H, H // K, T, S, sm_scale, sm_scale * LOG2E, D=D, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        num_warps=warps, num_stages=stages)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """(q, k, v, first, end, causal, tiles) -> out. first/end (B,) int32: row b's real keys are slots
    [first[b], end[b]). tiles: None (the TILES table), one (BLOCK_M, BLOCK_N, warps, stages) for every
    kernel, or a dict by kernel name ("fwd", "dkdv", "dq")."""

    @staticmethod
    def forward(ctx, q, k, v, first, end, causal=True, tiles=None):
        o, lse = _flash_forward(q, k, v, first, end, causal, tiles)
        ctx.save_for_backward(q, k, v, o, lse, first, end)
        ctx.causal, ctx.tiles = causal, tiles
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, first, end = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, first, end, ctx.causal, ctx.tiles)
        return dq, dk, dv, None, None, None, None


# -----------------------------------------------------------------------------------------------
# The entry point model.py calls


def no_padding(B, S, device):
    """first/end for rows with no padding: every key real."""
    return torch.zeros(B, dtype=torch.int32, device=device), torch.full((B,), S, dtype=torch.int32, device=device)


def bounds_mask(first, end, T, S, causal=True):
    """The (B, 1, T, S) bool mask the kernel implements for first/end (the form of model.causal_mask):
    key j visible to query i (slot start + i) iff first <= j < end and (if causal) j <= slot, plus the diagonal."""
    slot = torch.arange(S - T, S, device=first.device)[:, None]  # (T, 1)
    j = torch.arange(S, device=first.device)[None, :]  # (1, S)
    m = (j >= first[:, None, None]) & (j < end[:, None, None])  # (B, 1, S)
    if causal:
        m = m & (j <= slot)[None]
    return (m | (j == slot)[None])[:, None]  # (B, 1, T, S)


_last_bounds = (None, -1, None)  # (weakref to the last mask, its version counter, its bounds)


def padding_bounds(mask, T, S):
    """(B, 1, T, S) bool mask from model.causal_mask -> (first, end) int32 (B,), or None when the mask has
    any other form. Derived from the last query row (slot S - 1 sees every real key before it); key S - 1
    itself counts as real iff key S - 2 is (either way the mask, and the result, are the same)."""
    global _last_bounds
    ref, version, bounds = _last_bounds
    if ref is not None and ref() is mask and mask._version == version:
        return bounds  # every layer of one forward passes the same mask: check it once
    bounds = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:] == (1, T, S):
        last = mask[:, 0, -1, :]  # (B, S)
        first = last.int().argmax(-1)  # its first True (the diagonal makes one)
        end = first + last[:, :-1].sum(-1)
        end = torch.where(end >= S - 1, S, end)
        first, end = first.int(), end.int()
        if torch.equal(mask, bounds_mask(first, end, T, S)):
            bounds = (first, end)
    _last_bounds = (weakref.ref(mask), mask._version, bounds)
    return bounds


def kernel_runs_on(q) -> bool:
    """The Triton kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter."""
    if triton is None:
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class AttentionShapeError(ValueError):
    """q, k, v shapes that do not fit together; the message is one line with the shapes."""


@torch.compiler.disable
def flash_attention(q, k, v, mask=None, causal=True):
    """q (B, H, T, D); k, v (B, K, S, D), H a multiple of K; mask None or the (B, 1, T, S) bool mask of
    model.causal_mask. Returns (B, H, T, D). Pad query rows (slot not a real key) are 0. Anything the
    kernel does not cover (another mask, a head dim outside HEAD_DIMS, fp32 on CUDA outside autocast, mixed
    dtypes, no Triton, CPU tensors without the interpreter) goes to SDPA on CUDA or to reference_attention
    on the CPU. Under torch.compile it is called as an opaque eager function (a graph break per layer):
    the kernel is fused already, and reading the mask needs Python."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if H % K or k.shape != v.shape or (causal and T > S):
        raise AttentionShapeError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                                  f"expected (B, H, T, D) and (B, K, S, D) with H a multiple of K and T <= S")
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # As SDPA does under autocast. It matters: the model's RoPE multiplies bf16 q/k by fp32 cos/sin,
        # so under bf16 autocast q and k arrive in fp32 and v in bf16.
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    # On a GPU, fp16/bf16 only: an exact fp32 tl.dot is scalar FMA code that takes minutes to compile and
    # loses to SDPA (tf32 would not be the fp32 asked for). On the CPU (the interpreter), fp32 only: the
    # interpreter's bf16 arithmetic is not faithful.
    dtypes = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float32,)
    bounds = None
    if kernel_runs_on(q) and D in HEAD_DIMS and q.dtype == k.dtype == v.dtype and q.dtype in dtypes:
        if mask is None:
            bounds = no_padding(B, S, q.device)
        elif causal:
            bounds = padding_bounds(mask, T, S)
    if bounds is None:
        if q.is_cuda:
            if mask is None and causal and T != S:  # SDPA's is_causal aligns to the top-left; we mean bottom-right
                mask = bounds_mask(*no_padding(B, S, q.device), T, S)
            if mask is not None and H != K:
                from model import grouped_sdpa  # a mask with SDPA's enable_gqa would take its math kernel
                return grouped_sdpa(q, k, v, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                  enable_gqa=H != K)
        return reference_attention(q, k, v, mask, causal)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttention.apply(q, k, v, bounds[0], bounds[1], causal, None)


# -----------------------------------------------------------------------------------------------
# GPU check and benchmark: python attention.py --bench


@dataclass
class BenchConfig:
    batch: int = 8  # B of the timed shapes
    heads: int = 32  # H (query heads)
    gqa_kv_heads: int = 8  # K of the grouped-query rows
    seqs: tuple = (1024, 2048)  # T = S of the timed shapes (causal)
    head_dims: tuple = (64, 128)  # D of the timed shapes
    reps: int = 20  # timed repetitions (median), after 3 warm-up runs
    tune: bool = True  # sweep TUNE_CANDIDATES at T = max(seqs) before timing


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant]) tried per kernel: every value of {64, 128} x {4, 8} x
# {2, 3, 4} appears, without the full product (each candidate costs a compile of a few seconds); the forward's
# candidates come in its four variants.
TUNE_CANDIDATES = {
    "fwd": [(128, 64, 4, 3, 0), (128, 64, 8, 3, 0), (128, 128, 8, 3, 0), (64, 64, 4, 4, 0), (128, 64, 4, 2, 0),
            (128, 64, 4, 3, 1), (128, 64, 8, 3, 1), (128, 128, 8, 3, 1), (64, 64, 4, 4, 1), (128, 64, 8, 4, 1),
            (128, 64, 8, 3, 2), (128, 128, 8, 3, 2), (128, 64, 8, 3, 3), (128, 128, 8, 3, 3), (128, 64, 8, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 128, 8, 2)],
}


def _cuda_ms(fn, reps):
    """Median milliseconds of fn() over reps runs, timed with CUDA events, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: check() under the interpreter, in the tests


def _inputs(B, H, K, T, S, D, dtype, seed=0):
    g = torch.Generator(device=_device()).manual_seed(seed)
    return [torch.randn(shape, device=_device(), dtype=dtype, generator=g).requires_grad_()
            for shape in ((B, H, T, D), (B, K, S, D), (B, K, S, D))]


def tune(cfg: BenchConfig):
    """Time each candidate tile config of each kernel on the largest causal shape; keep the fastest in TILES."""
    B, H, T = cfg.batch, cfg.heads, max(cfg.seqs)
    for D in cfg.head_dims:
        q, k, v = _inputs(B, H, H, T, T, D, torch.bfloat16)
        first, end = no_padding(B, T, "cuda")
        o, lse = _flash_forward(q, k, v, first, end, True)
        do = torch.randn_like(o)
        for kind, cands in TUNE_CANDIDATES.items():
            def run(c):  # time one kernel's candidate; the other kernels keep their current tiles
                tiles = {name: TILES[(name, D)] for name in ("fwd", "dkdv", "dq")} | {kind: c}
                if kind == "fwd":
                    return _flash_forward(q, k, v, first, end, True, tiles)
                return _flash_backward(do, q, k, v, o, lse, first, end, True, tiles)
            timed = []
            for c in cands:
                try:
                    timed.append((_cuda_ms(lambda: run(c), 5), c))
                except Exception as e:  # e.g. out of shared memory for this tile size
                    print(f"  {kind} D={D} {c}: skipped ({type(e).__name__})")
            best = min(timed)
            TILES[(kind, D)] = best[1]
            listed = ", ".join(f"{c}={ms:.3f}ms" for ms, c in timed)
            print(f"  {kind:>4} D={D:<3}: {listed}  -> chosen {best[1]}")


def check(B, H, K, T, S, D, causal, dtype, left=None, right=None, tiles=None):
    """Ours vs the fp32 reference on fresh inputs: relative error of out, dq, dk, dv on real rows, every
    output written (outputs start NaN-filled), pad rows exactly 0. tiles: as FlashAttention's (None: TILES).
    Returns (ok, message)."""
    global FILL_NAN
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
    bounds = padding_bounds(mask, T, S) if mask is not None else no_padding(B, S, _device())
    assert bounds is not None, "the model's mask was not recognised"
    FILL_NAN = True
    try:
        out = FlashAttention.apply(q, k, v, bounds[0], bounds[1], causal, tiles)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    finally:
        FILL_NAN = False
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32, mask, causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float() * real)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    errs = [rel(out * real, ref * real)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
    pad_zero = (out * ~real).abs().max().item() == 0 and (grads[0] * ~real).abs().max().item() == 0
    ok = finite and pad_zero and errs[0] < 1e-2 and max(errs[1:]) < 2e-2
    variant = f" forward variant {tiles['fwd'][4]}" if isinstance(tiles, dict) else ""
    msg = (f"B{B} H{H} K{K} T{T} S{S} D{D} {'causal' if causal else 'full'} {str(dtype)[6:]} left={left} "
           f"right={right}{variant}: rel err out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}, "
           f"all written {finite}, pad rows 0 {pad_zero} -> {'PASS' if ok else 'FAIL'}")
    return ok, msg


def benchmark(cfg: BenchConfig = BenchConfig()) -> int:
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if cfg.tune:
        print("tile sweep (bf16, causal, B%d H%d T%d):" % (cfg.batch, cfg.heads, max(cfg.seqs)))
        tune(cfg)
    print(f"chosen tiles {TILES}  [{time.time() - t0:.0f}s]")
    results = [check(2, 8, 8, 1024, 1024, 128, True, torch.bfloat16),
               check(2, 8, 2, 777, 777, 64, True, torch.bfloat16, left=[0, 100]),
               check(2, 4, 4, 300, 300, 64, False, torch.float16),
               check(2, 8, 2, 400, 400, 128, True, torch.float16, left=[10, 0], right=[50, 3]),
               check(2, 8, 2, 5, 500, 128, True, torch.bfloat16, left=[0, 37]),
               check(3, 8, 1, 1, 333, 64, True, torch.bfloat16, left=[0, 5, 200]),
               check(4, 6, 2, 300, 300, 32, True, torch.bfloat16, left=[0, 50, 0, 299])]  # model.py's "embedded" heads
    for variant in range(4):  # every forward variant the sweep may pick, on a padded GQA case
        tiles = {"fwd": TILES[("fwd", 64)][:4] + (variant,), "dkdv": TILES[("dkdv", 64)], "dq": TILES[("dq", 64)]}
        results.append(check(2, 8, 2, 777, 777, 64, True, torch.bfloat16, left=[0, 100], right=[30, 0], tiles=tiles))
    # As the model calls it under bf16 autocast: q, k in fp32 (RoPE promotes them), v in bf16.
    q, k, v = _inputs(2, 8, 2, 256, 256, 64, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = flash_attention(q, k, v.bfloat16())
    err = ((out.float() - reference_attention(q, k, v)).norm() / reference_attention(q, k, v).norm()).item()
    ok = out.dtype == torch.bfloat16 and out.stride(2) == 8 * 64 and err < 1e-2  # the kernel's (B, T, H, D) layout
    results.append((ok, f"under bf16 autocast with fp32 q/k: kernel used {out.stride(2) == 8 * 64}, rel err {err:.1e} "
                        f"-> {'PASS' if ok else 'FAIL'}"))
    for _, msg in results:
        print(msg)
    print(f"[{time.time() - t0:.0f}s]")
    print("\n| B | H | K | T | D | pass | ours ms | ours TFLOP/s | SDPA ms | SDPA TFLOP/s | SDPA time / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = [(cfg.heads, T, D) for D in cfg.head_dims for T in cfg.seqs]
    shapes += [(cfg.gqa_kv_heads, max(cfg.seqs), D) for D in cfg.head_dims]
    B, H = cfg.batch, cfg.heads
    for K, T, D in shapes:
        q, k, v = _inputs(B, H, K, T, T, D, torch.bfloat16)
        do = torch.randn_like(q)
        ours = lambda: flash_attention(q, k, v, None)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
        flops = 4 * B * H * T * T * D / 2  # causal forward: two matmuls, half the score matrix
        for name, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # the backward counts 2.5x the forward (FlashAttention)
            f_ours, f_sdpa = ours, sdpa
            if name == "fwd+bwd":
                f_ours, f_sdpa = lambda: ours().backward(do), lambda: sdpa().backward(do)
            with torch.set_grad_enabled(name != "fwd"):
                a, b = _cuda_ms(f_ours, cfg.reps), _cuda_ms(f_sdpa, cfg.reps)
            tf = lambda ms: flops * mult / ms / 1e9
            print(f"| {B} | {H} | {K} | {T} | {D} | {name} | {a:.3f} | {tf(a):.0f} | {b:.3f} | {tf(b):.0f} "
                  f"| {b / a:.2f} |")
        del q, k, v, do
    # One decode step behind a left-padded KV cache: the case the docstring sends to SDPA.
    from model import causal_mask
    K, S, D = cfg.gqa_kv_heads, max(cfg.seqs), max(cfg.head_dims)
    q, k, v = _inputs(B, H, K, 1, S, D, torch.bfloat16)
    key_mask = torch.arange(S, device="cuda")[None, :] >= torch.arange(B, device="cuda")[:, None] * 16
    mask = causal_mask(key_mask, S - 1, 1)
    from model import grouped_sdpa
    with torch.no_grad():
        a = _cuda_ms(lambda: flash_attention(q, k, v, mask), cfg.reps)
        b = _cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), cfg.reps)
        c = _cuda_ms(lambda: grouped_sdpa(q, k, v, mask), cfg.reps)  # what the model runs for a decode step
    print(f"| {B} | {H} | {K} | 1 (S={S}) | {D} | decode fwd | {a:.3f} | - | {b:.3f} | - | {b / a:.2f} |")
    print(f"| {B} | {H} | {K} | 1 (S={S}) | {D} | decode fwd, SDPA with the query heads folded (model.grouped_sdpa) "
          f"in the SDPA columns | {a:.3f} | - | {c:.3f} | - | {c / a:.2f} |")
    print(f"\ntotal {time.time() - t0:.0f}s")
    return 0 if all(ok for ok, _ in results) else 1


# -----------------------------------------------------------------------------------------------
# Build report, no GPU needed: python attention.py --build-report


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
    kernels = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
    rows = []
    jobs = [(kind, D, TILES[(kind, max(D, 64))]) for D in head_dims for kind in kernels]
    jobs += [("fwd", D, TILES[("fwd", D)][:4] + (v,)) for D in head_dims for v in range(4)  # the other variants
             if v != TILES[("fwd", D)][4]]
    for kind, D, tiles in jobs:
        fn = kernels[kind]
        BM, BN, warps, stages = tiles[:4]
        consts = dict(D=D, CAUSAL=True, BLOCK_M=BM, BLOCK_N=BN)
        arg_types = dict(types)
        if kind == "fwd":
            consts.update(SPLIT=bool(tiles[4] & 1), TMA=bool(tiles[4] & 2))
            if consts["TMA"]:  # K and V as tensor descriptors with the tile's block shape
                arg_types.update(K=f"tensordesc<bf16[1,1,{BN},{D}]>", V=f"tensordesc<bf16[1,1,{BN},{D}]>")
        signature = {a: "constexpr" if a in consts else arg_types.get(a, "i32") for a in fn.arg_names}  # rest: i32
        # As a launch at the benchmark's shapes specialises: pointers, strides and sizes divisible by 16
        # (without it the loads are neither vectorised nor pipelined, and the report would describe
        # another program); G, the query heads per kv head, and the float scales are not.
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and a not in ("G", "qk_scale", "sm_scale") and "tensordesc" not in signature[a]}
        t = time.time()
        k = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        secs = time.time() - t
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        reg, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
        # loads pipelined through shared memory: cp.async by the warps, or bulk tensor copies (TMA)
        async_copies = len(re.findall(r"cp\.async\.(?:c[ag]|bulk\.tensor)\.", k.asm["ptx"]))
        rows.append(dict(kernel=kind, D=D, tiles=tiles, registers=reg, stack_bytes=stack, async_copies=async_copies,
                         shared_bytes=k.metadata.shared, compile_s=secs))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="Flash attention in Triton: GPU correctness check and benchmark.")
    ap.add_argument("--bench", action="store_true", help="check against the fp32 reference, sweep tiles, time vs SDPA")
    ap.add_argument("--no-tune", dest="tune", action="store_false", help="skip the tile sweep (use TILES as written)")
    ap.add_argument("--reps", type=int, default=BenchConfig.reps)
    ap.add_argument("--build-report", action="store_true",
                    help="no GPU needed: build the kernels for sm_90 and print registers, spills, shared memory")
    args = ap.parse_args(argv)
    if args.build_report:
        if triton is None:
            print("error: --build-report needs Triton (pip install triton)", file=sys.stderr)
            return 2
        print(f"triton {triton.__version__}, sm_90, causal bf16, tiles from TILES")
        print("| kernel | D | tiles (BLOCK_M, BLOCK_N, warps, stages[, variant]) | registers | stack (spill) bytes "
              "| async copies | shared KB |")
        print("|---|---|---|---|---|---|---|")
        for r in build_report():
            print(f"| {r['kernel']} | {r['D']} | {r['tiles']} | {r['registers']} | {r['stack_bytes']} "
                  f"| {r['async_copies']} | {r['shared_bytes'] / 1024:.0f} |")
        return 0
    if not args.bench:
        ap.print_help()
        return 0
    if triton is None or not torch.cuda.is_available():
        print("error: --bench needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    return benchmark(BenchConfig(reps=args.reps, tune=args.tune))


if __name__ == "__main__":
    sys.exit(main())
