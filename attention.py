"""
Flash attention in Triton (fused forward and backward), and the plain-math attention it is checked against.

    python bench_attention.py                   # on a CUDA GPU: correctness, tile sweep, timings against SDPA
    python bench_attention.py --build-report    # anywhere: build for sm_90, print registers / spills / shared memory

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
The forward's variants are picked by the 5th field of its tiles (bits SPLIT = 1, TMA = 2, ...). SPLIT:
one loop over every tile with a branch on the tile index (0), or a branch-free loop over the fully
visible tiles followed by a loop over the few edge tiles (1), whose main loop has no branch, no load
bounds and no mask (built for sm_90 at D64, 289 instructions per warp and key tile against 445). TMA: K/V
tiles loaded by the program's own warps through cp.async (0), or fetched by Hopper's bulk tensor copy engine
from host-made tensor descriptors (1), which frees those warps and registers for the softmax. All four build for sm_90 without spilling (`bench_attention.py --build-report`);
which is fastest is the GPU sweep's to say. (Three loops, edge / middle / edge, spilled registers when
built for sm_90 with Triton 3.9.) A third bit, LONGEST_FIRST = 4, only orders the work: under a causal
mask the query tiles of a head run last to first, so the tiles that see the most keys start first and the
last programs of the grid are short ones (less time with most SMs idle at the end); the numbers are the same.
The dQ kernel, whose query tiles have the same causal imbalance, takes the same bit as an optional 5th field.
A fourth bit, AHEAD = 8 (a form of SPLIT: 8 + v builds what 9 + v does), reorders the split loops' main loop
so each tile's scores q k^T are computed one iteration before its softmax (`_fwd_full_tiles_ahead`). A
Hopper product (wgmma) is asynchronous: in the plain loop the warps wait for q k^T, then do the softmax while
the tensor cores sit idle, then issue p v. With the scores a tile ahead, the compiler is free to overlap a
product with the softmax (FlashAttention-3's intra-warpgroup overlap); what Triton 3.6 makes of it, read off
the sm_90 build: at D64, the p v of one tile runs during the next tile's softmax; at D128 with 64-row tiles on
4 warps, q k^T of the next tile is issued amid this tile's exponentials; at D128 with 8 warps, ptxas runs out
of registers and waits after every wgmma instruction (`--build-report`, column "HGMMA per wait" = 1), which
is slower, not faster. The price is a second score tile in registers, so fewer programs fit on an SM.

The backward recomputes the probabilities from the saved lse (p = exp2(s - lse)) instead of storing
them, and uses delta = rowsum(dO * O) (so dS = P * (dP - delta), the softmax Jacobian). Two kernels:
  - dK/dV: one program per (key tile, kv head). It loops over the H/K query heads of its group and over
    their query tiles, accumulating dK and dV in registers, and writes them once. Summing the group
    inside the kernel needs no (B, H, S, D) fp32 buffer, no second reduction pass and no atomics (so the
    result is deterministic); the price is K instead of H programs per key tile, which only matters when
    B * K * S / BLOCK_N is smaller than the number of SMs.
  - dQ: one program per (query tile, head), streaming key tiles like the forward.
Pad rows store lse = +inf, so the recomputed p = exp2(s - inf) is exactly 0 there: the backward needs
no row mask at all, only the key visibility mask on edge tiles. Both kernels take the forward's SPLIT as
bit 1 of an optional 5th field of their tiles (dQ also LONGEST_FIRST, 4): a branch-free loop over the
tiles that need no bounds and no mask, then the edge tiles. Built for sm_90, that loop issues about half
the instructions per tile of the single loop with a branch, whose every tile pays for masked loads.

The mask. model.py passes None (plain causal, T == S) or the boolean (B, 1, T, S) mask of
model.causal_mask. The kernel reads no T x S mask: `padding_bounds` turns it, once per forward (the
same mask tensor serves every layer), into first/end per row and checks that rebuilding the mask
from them gives the same tensor. Any other mask goes to the fallback (SDPA on CUDA, the reference on
CPU), so results never silently change.

Decoding (T = 1 behind the KV cache): use SDPA, not this kernel. A query tile has at least 16 rows
(the tensor-core minimum) and is tuned at 64-128, so at T = 1 all but one row of every tile is wasted
work, and there are only B * H programs, each streaming all S keys alone: on a large GPU with small B
most SMs idle. SDPA (or a split-K "flash-decoding" kernel, which splits S across programs and merges
the partial softmaxes) is the right tool there; bench_attention.py times one decode step of both.
The kernel is still correct at T = 1 (the tests run it), so nothing breaks if it is called.

Where it runs. On CUDA fp16/bf16 tensors (or under bf16/fp16 autocast) when Triton is installed. On
CPU fp32 tensors only under TRITON_INTERPRET=1 (Triton's interpreter, used by the tests; set it before
triton is imported). Everything else gets SDPA (CUDA) or the math reference (CPU). Importing this file
never needs Triton.
"""

import json
import math
import os
import weakref

import torch

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
# forward a 5th field, its variant: SPLIT + 2 * TMA + 4 * LONGEST_FIRST + 8 * AHEAD (see the module docstring),
# and an optional 6th, a cap on registers per thread (ptxas's maxnreg: 128 fits two 8-warp programs on an SM,
# 65,536 registers, at the price of some spilling); head dims below 64 use the 64 row. The fastest of
# bench_attention.TUNE_CANDIDATES in its sweep on one H100 (B8 H32 T2048 causal bf16, Triton 3.6, when only
# variant 0 existed; docs/PERFORMANCE.md); bench_attention.py sweeps again and overwrites these for its own run.
TILES = {
    ("fwd", 64): (128, 64, 8, 3, 0), ("fwd", 128): (128, 64, 8, 3, 0),
    ("dkdv", 64): (64, 64, 4, 3), ("dkdv", 128): (64, 128, 8, 2),
    ("dq", 64): (64, 64, 4, 2), ("dq", 128): (128, 128, 8, 2),
}
INTERPRET_TILES = (16, 16, 1, 1)  # under the CPU interpreter: the smallest tile tl.dot accepts


def save_tiles(path: str):
    """Write TILES (say, a GPU sweep's winners: bench_attention.py --save-tiles) to a JSON file, atomically."""
    with open(path + ".tmp", "w") as f:
        json.dump([[kind, D, list(t)] for (kind, D), t in sorted(TILES.items())], f)
    os.replace(path + ".tmp", path)


def load_tiles(path: str) -> dict:
    """Update TILES from a save_tiles file (bench.py --attention-tiles); returns the entries read. A file of
    another form raises ValueError naming the file and the entry, and leaves TILES as it was."""
    with open(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    read = {}
    for row in rows if isinstance(rows, list) else [rows]:
        ok = isinstance(row, list) and len(row) == 3 and row[0] in ("fwd", "dkdv", "dq") and isinstance(row[1], int)
        if not (ok and isinstance(row[2], list) and 4 <= len(row[2]) <= 6 and all(type(x) is int for x in row[2])):
            raise ValueError(f"{path}: entry {row!r}: expected [kernel, head_dim, [BLOCK_M, BLOCK_N, warps, stages, ...]]")
        read[(row[0], row[1])] = tuple(row[2])
    TILES.update(read)
    return read
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
def _mask_edge(s, slot, n0, first, end, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores s (BLOCK_M query rows at slots `slot`, BLOCK_N keys from n0), keys a row may not see at -inf."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return tl.where(_visible(slot[:, None], offs_n[None, :], first, end, CAUSAL), s, float("-inf"))


@jit
def _edge_count(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """The edge tiles of [lo, hi) around its unmasked run [full_lo, full_hi) (the split loops' second loop):
    (how many lie left of the run, how many in all). At most one lies left (the padding edge); the ones
    right of it are the causal diagonal or the end of the keys."""
    n_left = tl.cdiv(tl.maximum(tl.minimum(full_lo, hi) - lo, 0), BLOCK)
    return n_left, n_left + tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK)


@jit
def _edge_start(i, n_left, lo, full_hi, BLOCK: tl.constexpr):
    """Where edge tile i starts: left of the run first, then right of it (the softmax and the gradient sums
    do not care about the order)."""
    return tl.where(i < n_left, lo + i * BLOCK, full_hi + (i - n_left) * BLOCK)


@jit
def _load_tile(base, b, kvh, n0, offs_d, stride, end, CHECK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               TMA: tl.constexpr):
    """The (BLOCK_N, D) K or V tile of keys n0 .. n0 + BLOCK_N - 1. TMA: base is a tensor descriptor of K or V
    (B, K, S, D) and the tile is one bulk copy (keys past S read as 0). Otherwise base points at this (batch,
    kv head); CHECK: keys at or past `end` read as 0 (the caller masks them), else no bound at all.
    (Tile pointers are built here from the scalar base: a pointer block kept across the loop costs registers.)"""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if TMA:
        x = base.load([b.to(tl.int32), kvh, n0, 0]).reshape(BLOCK_N, D)  # descriptor coordinates are int32
    elif CHECK:
        x = tl.load(base + offs_n[:, None] * stride + offs_d[None, :], mask=(offs_n < end)[:, None], other=0.0)
    else:
        x = tl.load(base + offs_n[:, None] * stride + offs_d[None, :])
    return x


@jit
def _online_softmax(s, v, qk_scale, m_i, l_i, acc, MASKED: tl.constexpr):
    """Fold one key tile, given its raw scores s = q k^T (BLOCK_M, BLOCK_N; -inf where masked) and its values v,
    into the online softmax (m_i, l_i, acc). MASKED: s may hold -inf (an edge tile)."""
    # The scale goes on the row max (qk_scale > 0 keeps the argmax) and into one multiply-add per score below,
    # rather than a separate multiply of every score first: the softmax arithmetic is what bounds this loop.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = m_new  # a fully visible tile gives every row a finite max
    if MASKED:  # a pad row may have seen no visible key yet: keep -inf - -inf (nan) out of its running sums
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # the product accumulates into acc (in place on Hopper)
    return m_new, l_i, acc


@jit
def _fwd_tile(q, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale, m_i, l_i, acc, edge,
              CHECK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Fold the key tile starting at n0 into the online softmax (m_i, l_i, acc). CHECK=False: the caller
    knows every key of the tile is real and visible to every row, so no load bound and no mask. CHECK=True:
    loads stop at `end`, and the visibility mask is applied where `edge` (a tile on the diagonal or the
    padding edge); with TMA, keys in [end, S) are masked like any other edge."""
    k = _load_tile(k_base, b, kvh, n0, offs_d, sks, end, CHECK, BLOCK_N, D, TMA)
    v = _load_tile(v_base, b, kvh, n0, offs_d, svs, end, CHECK, BLOCK_N, D, TMA)
    s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) raw scores q.k; times qk_scale they are in log2 units
    if CHECK:
        if edge:
            s = _mask_edge(s, slot, n0, first, end, CAUSAL, BLOCK_N)
    return _online_softmax(s, v, qk_scale, m_i, l_i, acc, CHECK)


@jit
def _fwd_full_tiles_ahead(q, k_base, v_base, b, kvh, full_lo, full_hi, offs_d, sks, svs, qk_scale, m_i, l_i, acc,
                          BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """The fully visible tiles [full_lo, full_hi) (at least one), the scores of each tile computed one
    iteration before its softmax (FlashAttention-3, section 3.2, intra-warpgroup overlapping). No product
    then waits on the softmax just before it, so the tensor cores can work through a softmax instead of
    idling (which product overlaps which is the compiler's schedule: see the module docstring). The price is
    a second score tile in registers (BLOCK_M x BLOCK_N fp32)."""
    k = _load_tile(k_base, b, kvh, full_lo, offs_d, sks, 0, False, BLOCK_N, D, TMA)
    s = tl.dot(q, tl.trans(k))
    for n0 in range(full_lo, full_hi - BLOCK_N, BLOCK_N):
        k_next = _load_tile(k_base, b, kvh, n0 + BLOCK_N, offs_d, sks, 0, False, BLOCK_N, D, TMA)
        s_next = tl.dot(q, tl.trans(k_next))  # the next tile's scores: only carried to the next iteration
        v = _load_tile(v_base, b, kvh, n0, offs_d, svs, 0, False, BLOCK_N, D, TMA)
        m_i, l_i, acc = _online_softmax(s, v, qk_scale, m_i, l_i, acc, False)
        s = s_next
    v = _load_tile(v_base, b, kvh, full_hi - BLOCK_N, offs_d, svs, 0, False, BLOCK_N, D, TMA)
    return _online_softmax(s, v, qk_scale, m_i, l_i, acc, False)


@jit
def _fwd_kernel(Q, K, V, O, LSE, FIRST, END, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
                H, G, T, S, qk_scale, D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, LONGEST_FIRST: tl.constexpr,
                AHEAD: tl.constexpr):
    # TMA: K and V arrive as tensor descriptors (B, K, S, D) with (1, 1, BLOCK_N, D) blocks, not pointers.
    pid_m = tl.program_id(0)
    if LONGEST_FIRST:  # causal: the last query tile of a head sees the most keys; start it first, so the short
        pid_m = tl.num_programs(0) - 1 - pid_m  # tiles of the last heads fill the end of the run, not the long ones
    m0 = pid_m * BLOCK_M
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
        if AHEAD:  # the same tiles, each tile's scores computed one iteration ahead of its softmax
            if full_hi > full_lo:
                m_i, l_i, acc = _fwd_full_tiles_ahead(q, k_base, v_base, b, kvh, full_lo, full_hi, offs_d, sks, svs,
                                                      qk_scale, m_i, l_i, acc, BLOCK_N, D, TMA)
        else:
            for n0 in range(full_lo, full_hi, BLOCK_N):  # the fully visible tiles: no bounds, no mask, no branch
                m_i, l_i, acc = _fwd_tile(q, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs,
                                          qk_scale, m_i, l_i, acc, False, False, CAUSAL, BLOCK_N, D, TMA)
        n_left, n_edge = _edge_count(lo, hi, full_lo, full_hi, BLOCK_N)  # then the tiles that need the mask
        for i in range(0, n_edge):
            n0 = _edge_start(i, n_left, lo, full_hi, BLOCK_N)
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
def _dkdv_tile(k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d, start, first, end, sqt, sdt, T,
               qk_scale, dk, dv, edge, CHECK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Add the query tile starting at m0 (of one query head) to this key tile's dk and dv. CHECK=False: the
    caller knows every row of the tile is in range and sees every key of the tile: no bounds, no mask.
    CHECK=True: rows past T read as 0 with lse = +inf (p = 0), and the visibility mask applies where `edge`."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if CHECK:
        inb = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=inb[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :], mask=inb[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=inb, other=float("inf"))  # +inf: out of range, p = 0
        delta = tl.load(delta_base + offs_m, mask=inb, other=0.0)
    else:
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :])
        do = tl.load(do_base + offs_m[:, None] * sdt + offs_d[None, :])
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    sT = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): scores kept transposed, keys x queries
    if CHECK:
        if edge:
            sT = tl.where(_visible(start + offs_m[None, :], offs_n[:, None], first, end, CAUSAL), sT, float("-inf"))
    pT = tl.exp2(sT - lse[None, :])  # the probabilities, recomputed
    dv = tl.dot(pT.to(do.dtype), do, dv)  # accumulate in the product, not by a separate add
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, FIRST, END, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                     sdb, sdh, sdt, sdkb, sdkh, sdks, sdvb, sdvh, sdvs, H, G, T, S, sm_scale, qk_scale,
                     D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     SPLIT: tl.constexpr):
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
    # SPLIT (as the forward's): the full tiles in a loop with no bounds and no mask, then the edge tiles.
    n_left, n_edge = _edge_count(lo, r_hi, full_lo, full_hi, BLOCK_M)
    for g in range(0, G):  # the query heads that share this kv head: their gradients sum here
        h = kvh * G + g
        q_base, do_base = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
        lse_base, delta_base = LSE + (b * H + h) * T, DELTA + (b * H + h) * T
        if SPLIT:
            for m0 in range(full_lo, full_hi, BLOCK_M):
                dk, dv = _dkdv_tile(k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d, start, first, end,
                                    sqt, sdt, T, qk_scale, dk, dv, False, False, CAUSAL, BLOCK_M)
            for i in range(0, n_edge):
                m0 = _edge_start(i, n_left, lo, full_hi, BLOCK_M)
                dk, dv = _dkdv_tile(k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d, start, first, end,
                                    sqt, sdt, T, qk_scale, dk, dv, True, True, CAUSAL, BLOCK_M)
        else:
            for m0 in range(lo, r_hi, BLOCK_M):
                dk, dv = _dkdv_tile(k, v, q_base, do_base, lse_base, delta_base, m0, offs_n, offs_d, start, first, end,
                                    sqt, sdt, T, qk_scale, dk, dv, (m0 < full_lo) | (m0 >= full_hi), True, CAUSAL,
                                    BLOCK_M)
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=key_in)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_in)


@jit
def _dq_tile(q, do, lse, delta, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale, dq, edge,
             CHECK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Add the key tile starting at n0 to dq = sum over keys of dS k. CHECK and edge as in _fwd_tile."""
    k = _load_tile(k_base, b, kvh, n0, offs_d, sks, end, CHECK, BLOCK_N, D, False)
    v = _load_tile(v_base, b, kvh, n0, offs_d, svs, end, CHECK, BLOCK_N, D, False)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if CHECK:
        if edge:
            s = _mask_edge(s, slot, n0, first, end, CAUSAL, BLOCK_N)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, FIRST, END, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                   sdb, sdh, sdt, sdqb, sdqh, sdqt, H, G, T, S, sm_scale, qk_scale, D: tl.constexpr,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   LONGEST_FIRST: tl.constexpr):
    pid_m = tl.program_id(0)
    if LONGEST_FIRST:  # as in the forward: the query tiles that see the most keys first
        pid_m = tl.num_programs(0) - 1 - pid_m
    m0 = pid_m * BLOCK_M
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
    if SPLIT:  # as the forward's SPLIT: a loop over the fully visible tiles with no bounds and no mask, then the edges
        for n0 in range(full_lo, full_hi, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale,
                          dq, False, False, CAUSAL, BLOCK_N, D)
        n_left, n_edge = _edge_count(lo, hi, full_lo, full_hi, BLOCK_N)
        for i in range(0, n_edge):
            n0 = _edge_start(i, n_left, lo, full_hi, BLOCK_N)
            dq = _dq_tile(q, do, lse, delta, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale,
                          dq, True, True, CAUSAL, BLOCK_N, D)
    else:
        for n0 in range(lo, hi, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, k_base, v_base, b, kvh, n0, offs_d, slot, first, end, sks, svs, qk_scale,
                          dq, (n0 < full_lo) | (n0 >= full_hi), True, CAUSAL, BLOCK_N, D)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=inb[:, None])


# -----------------------------------------------------------------------------------------------
# Launchers and the autograd Function

FILL_NAN = False  # bench_attention.check(): allocate every output NaN-filled, to prove the kernels write all of it


def _empty(*shape, like, dtype=None):
    t = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    return t.fill_(float("nan")) if FILL_NAN else t


def _empty_like(x):
    t = torch.empty_like(x)
    return t.fill_(float("nan")) if FILL_NAN else t


def variant(tiles) -> int:
    """A kernel's variant bits: the optional 5th field of its tiles (0 without one)."""
    return tiles[4] if len(tiles) > 4 else 0


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
    bits = variant(cfg)  # the forward's: SPLIT, TMA, LONGEST_FIRST, AHEAD
    regs = cfg[5] if len(cfg) > 5 else 0  # its 6th: a cap on registers per thread (0: the compiler's choice)
    kk, vv = k, v
    if bits & 2 and (TensorDescriptor is None or not all(_tma_aligned(t) for t in (k, v))):
        bits &= ~2  # the copy engine needs descriptors and 16-byte aligned bases and strides; the warps' loads do not
    if bits & 2:  # K/V tiles by the bulk tensor copy engine: host-side descriptors with the tile's block shape
        kk, vv = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, BN, D]) for t in (k, v))
    # Output laid out (B, T, H, D) in memory and returned as a (B, H, T, D) view, so the model's
    # transpose(1, 2).reshape(B, T, H * D) that follows is free.
    o = _empty(B, T, H, D, like=q).transpose(1, 2)
    lse = _empty(B, H, T, like=q, dtype=torch.float32)
    _fwd_kernel[((T + BM - 1) // BM, B * H)](
        q, kk, vv, o, lse, first, end, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, H // K, T, S, LOG2E / math.sqrt(D), D=D, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        SPLIT=bool(bits & 9), TMA=bool(bits & 2), LONGEST_FIRST=bool(bits & 4) and causal,
        AHEAD=bool(bits & 8), num_warps=warps, num_stages=stages, **({"maxnreg": regs} if regs else {}))
    return o, lse


def _flash_backward(do, q, k, v, o, lse, first, end, causal, tiles=None):
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()  # e.g. the expanded ones of out.sum().backward()
    sm_scale = 1.0 / math.sqrt(D)
    delta = _empty(B, H, T, like=q, dtype=torch.float32)
    _bwd_delta_kernel[((T + 63) // 64, B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                               D=D, BLOCK_M=64)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)  # same memory layout as the inputs
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    cfg = _tiles("dkdv", D, q, tiles)
    BM, BN, warps, stages = cfg[:4]
    _bwd_dkdv_kernel[((S + BN - 1) // BN, B * K)](
        q, k, v, do, lse, delta, dk, dv, first, end, *strides, *dk.stride()[:3], *dv.stride()[:3],
        H, H // K, T, S, sm_scale, sm_scale * LOG2E, D=D, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        SPLIT=bool(variant(cfg) & 1), num_warps=warps, num_stages=stages)  # dK/dV's variant bits: SPLIT
    cfg = _tiles("dq", D, q, tiles)
    BM, BN, warps, stages = cfg[:4]
    bits = variant(cfg)  # dQ's: SPLIT (1) and LONGEST_FIRST (4), as the forward's
    _bwd_dq_kernel[((T + BM - 1) // BM, B * H)](
        q, k, v, do, lse, delta, dq, first, end, *strides, *dq.stride()[:3],
        H, H // K, T, S, sm_scale, sm_scale * LOG2E, D=D, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        SPLIT=bool(bits & 1), LONGEST_FIRST=causal and bool(bits & 4), num_warps=warps, num_stages=stages)
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
            from model import sdpa  # (masked grouped-query attention there avoids SDPA's math kernel)
            return sdpa(q, k, v, mask, causal)
        return reference_attention(q, k, v, mask, causal)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttention.apply(q, k, v, bounds[0], bounds[1], causal, None)
