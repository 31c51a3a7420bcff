"""
The training losses from the model's final hidden states, which never hold (B, T, V) logits, and the two
Triton kernels they use on a GPU (with the plain-PyTorch forms the kernels are tested against).

    chunked_cross_entropy(hidden, W, targets)            SFT's summed NLL (sft.py)
    chunked_token_logprobs(hidden, W, tokens, T)         log p(token) at temperature T (ppo.py's scoring)

hidden is model.Transformer(..., logits=False)'s output. The logits exist one chunk of n rows at a time,
z = h W^T (n, V), and for each chunk the losses need, per row i with token t_i at temperature T,

    lse_i  = log sum_v exp(z[i, v] / T)                          the log-sum-exp
    logp_i = z[i, t_i] / T - lse_i                               the token's log-prob (minus the NLL)
    d logp_i / d z[i, v] = ([v == t_i] - p_i[v]) / T,   p_i = exp(z_i / T - lse_i)

SFT's loss (chunked_cross_entropy(fused=True)) is the NLL summed over rows, its gradient softmax - onehot;
PPO's scoring (chunked_token_logprobs) is logp itself, whose backward scales that gradient by the upstream
d loss / d logp_i. Written as PyTorch ops each is a dozen passes over the (n, V) logits with fp32 copies
(upcast, divide, log-sum-exp, subtract, exp, one-hot, mask, cast back): at llama-1b's vocabulary (128,256)
about 6 GB of memory traffic per 1024 rows, 16 ms of a B8 T1024 training step on an H100.

Two kernels, one program per row:
  _lse_kernel   reads the row once and keeps, per lane, a running max m and a running sum l of exp(x - m)
                (the online softmax of FlashAttention, here with no values to carry), then combines the
                lanes into lse; it also picks out the token's z / T.
  _grad_kernel  reads the row again and writes scale_i * (p_i[v] - [v == t_i]) over the logits, in their
                dtype: scale_i = 1 (or 0 for an ignored row) for the summed NLL, -dlogp_i / T for logp.
One read of a bf16 chunk forward and one read and one write backward: about 0.8 GB per 1024 such rows in
all. The arithmetic is fp32; the gradient is rounded once, to the dtype of the logits, as the reference does.

The kernels run on CUDA tensors when Triton is installed, and in the tests on CPU tensors under
TRITON_INTERPRET=1; everything else takes the PyTorch forms. Importing this file never needs Triton.
"""

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language so the kernel signatures below still parse
        constexpr = None

jit = triton.jit if triton is not None else (lambda fn: fn)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit below, once: how the kernels were built
CPU_INTERPRETER = False  # the tests set it: CPU tensors through the kernels in Triton's interpreter, not the reference
BLOCK = 4096  # logits per program per loop step on a GPU (the interpreter's tests pass small blocks)


# -----------------------------------------------------------------------------------------------
# The reference: the formulas above in PyTorch.


def reference(z, targets, ignore_index: int = -100):
    """z (n, V) logits, targets (n,) ids -> (summed NLL over the rows not ignored, fp32 0-d; the gradient of that
    sum wrt z, (n, V) in z's dtype). z itself is left as it was."""
    zf = z.float()  # (n, V)
    lse = torch.logsumexp(zf, dim=-1)  # (n,)
    keep = targets != ignore_index
    t = torch.where(keep, targets, 0)
    loss = torch.where(keep, lse - zf.gather(-1, t[:, None]).squeeze(-1), 0.0).sum()
    g = (zf - lse[:, None]).exp_()  # (n, V) softmax
    g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
    return loss, g.mul_(keep[:, None]).to(z.dtype)


# -----------------------------------------------------------------------------------------------
# The kernels


@jit
def _lse_kernel(Z, TARGETS, LSE, ZT, stride, V, inv_temp, BLOCK: tl.constexpr):
    """Per row: LSE = log sum_v exp(z_v * inv_temp) and ZT = z_t * inv_temp (t = TARGETS[row], any id in [0, V))."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride
    m = tl.full((BLOCK,), float("-inf"), tl.float32)  # per lane: the running max of x = z * inv_temp
    l = tl.zeros((BLOCK,), tl.float32)  # per lane: the running sum of exp(x - m)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane past V: avoid -inf - -inf
        l = l * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    tl.store(LSE + row, m_row + tl.log(tl.sum(l * tl.exp(m - m_row), 0)))
    tl.store(ZT + row, tl.load(z_row + tl.load(TARGETS + row)).to(tl.float32) * inv_temp)


@jit
def _grad_kernel(Z, TARGETS, LSE, SCALE, stride, V, inv_temp, BLOCK: tl.constexpr):
    """Per row, over the logits: z_v <- SCALE * (exp(z_v * inv_temp - LSE) - [v == t])."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride
    t, lse, scale = tl.load(TARGETS + row), tl.load(LSE + row), tl.load(SCALE + row)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        x = tl.load(z_row + offs, mask=offs < V, other=0.0).to(tl.float32) * inv_temp
        g = scale * (tl.exp(x - lse) - tl.where(offs == t, 1.0, 0.0))
        tl.store(z_row + offs, g.to(Z.dtype.element_ty), mask=offs < V)


# -----------------------------------------------------------------------------------------------
# Launchers: kernel where it runs, PyTorch elsewhere


def kernel_runs_on(z) -> bool:
    """On CUDA tensors when the kernels were built for the GPU. On CPU tensors only when a test asks for it
    (CPU_INTERPRETER) and they were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    return not INTERPRETED if z.is_cuda else INTERPRETED and CPU_INTERPRETER


def _launchable(z) -> bool:
    return kernel_runs_on(z) and z.dim() == 2 and z.stride(-1) == 1


def _launch(kernel, z, args, block):
    n, V = z.shape
    kernel[(n,)](z, *args[:-1], z.stride(0), V, args[-1], BLOCK=min(block, triton.next_power_of_2(V)),
                 num_warps=8 if z.is_cuda else 1)


def token_lse(z, tokens, temperature: float = 1.0, block: int = BLOCK):
    """z (n, V) logits, tokens (n,) ids in [0, V) -> (lse (n,), z[i, tokens_i] / T (n,)), fp32; logp = the
    second minus the first."""
    if not _launchable(z):
        x = z.float() / temperature  # (n, V)
        return torch.logsumexp(x, dim=-1), x.gather(-1, tokens[:, None]).squeeze(-1)
    tokens = tokens.contiguous()  # read as TARGETS + row
    lse, zt = (torch.empty(z.shape[0], dtype=torch.float32, device=z.device) for _ in range(2))
    _launch(_lse_kernel, z, (tokens, lse, zt, 1.0 / temperature), block)
    return lse, zt


def softmax_grad_(z, tokens, lse, scale, temperature: float = 1.0, block: int = BLOCK):
    """Overwrite z (n, V) with scale_i * (softmax(z_i / T) - onehot(tokens_i)), in z's dtype, and return it:
    the gradient wrt z of sum_i -scale_i * T * logp_i. lse from token_lse; scale (n,) fp32."""
    if not _launchable(z):
        g = (z.float() / temperature - lse[:, None]).exp_()  # (n, V) softmax
        g[torch.arange(g.shape[0], device=g.device), tokens] -= 1.0
        return z.copy_(g.mul_(scale[:, None]))
    _launch(_grad_kernel, z, (tokens.contiguous(), lse, scale.float().contiguous(), 1.0 / temperature), block)
    return z


def cross_entropy_(z, targets, ignore_index: int = -100, block: int = BLOCK):
    """As `reference`, but the gradient is written over z (whose values are then gone): -> (summed NLL, fp32
    0-d; the gradient, which is z). Through the kernels where they run, their PyTorch forms elsewhere."""
    keep = targets != ignore_index
    t = torch.where(keep, targets, 0)
    lse, zt = token_lse(z, t, block=block)
    return torch.where(keep, lse - zt, 0.0).sum(), softmax_grad_(z, t, lse, keep.float(), block=block)


# -----------------------------------------------------------------------------------------------
# The losses. Each chunk's logits exist in the autocast dtype for one chunk of rows at a time, either under
# activation checkpointing (PyTorch ops; the backward recomputes the chunk) or in the autograd Functions
# below, which use the kernels. The log-sum-exp is taken in fp32 either way.


def _matmul_dtype(h):
    """The dtype the chunk matmuls run in: autocast's (bf16) if on, else the inputs'. (An autograd Function's
    backward runs outside autocast, so the Functions below cast explicitly.)"""
    return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype


def _nll_chunk(h, weight, targets, ignore_index: int):
    logits = F.linear(h, weight)  # (n, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed NLL of softmax(h @ weight.T) and its gradients in one pass over row chunks. The gradient
    of the NLL sum with respect to a row's logits is softmax - onehot (0 on ignored rows), so each chunk's
    dh and dweight are computed right after its loss, while its logits exist, and kept for the backward:
    the output projection runs once forward and twice for gradients, as without chunking, instead of the
    extra forward that recomputing each chunk in the backward costs (2 * N * d * V FLOPs, 7% of a llama-1b
    training step). The price: dweight (V, d) fp32 is held from the forward to the backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, ignore_index: int):
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.zeros_like(h) if need_h else None  # (N, d)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, d)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dt = _matmul_dtype(h)
        w = weight.to(dt)  # cast once, not per chunk
        for s in range(0, h.shape[0], chunk_rows):
            hc, tc = h[s:s + chunk_rows].to(dt), targets[s:s + chunk_rows]  # (n, d), (n,)
            z = F.linear(hc, w)  # (n, V) logits in the matmuls' dtype
            nll, g = cross_entropy_(z, tc, ignore_index)  # their NLL sum and d(NLL sum)/d logits (n, V), dt
            total = total + nll
            if need_h:
                dh[s:s + chunk_rows] = g @ w  # (n, d)
            if need_w:
                dw.add_(g.T @ hc)  # (V, d), accumulated in fp32
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors  # scaled by the upstream gradient (e.g. 1 / token count)
        return (None if dh is None else dh * grad_total.to(dh.dtype),
                None if dw is None else (dw * grad_total).to(ctx.weight_dtype), None, None, None)


def chunked_cross_entropy(hidden, weight, targets, chunk_rows: Optional[int] = None, ignore_index: int = -100,
                          fused: bool = False):
    """hidden (..., d), weight (V, d) (model.lm_head_weight), targets (...) ids, ignore_index where no
    loss is taken -> (sum of the NLL over counted targets, fp32 0-d; their count, long 0-d). Equal to
    F.cross_entropy(hidden @ weight.T, targets, reduction="sum") and its gradients.
    fused=False: each chunk's logits are recomputed in the backward (activation checkpointing). fused=True:
    the gradients are computed in the forward (_LinearCrossEntropy), one matmul fewer per chunk; used on
    CUDA with plain (not FSDP-sharded) weights, and only when a gradient is wanted.
    chunk_rows: rows of logits at a time; by default 1024, and 4096 fused, whose chunks cost less memory (the
    bf16 logits only, the gradient written over them: 1 GB at a 128k vocabulary) and each add a (V, d) fp32
    read and write to dweight's accumulation (3 GB of traffic at llama-1b), so fewer is faster."""
    chunk_rows = chunk_rows or (4096 if fused else 1024)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    t = targets.reshape(-1)  # (N,)
    if fused and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, chunk_rows, ignore_index), (t != ignore_index).sum()
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for hc, tc in zip(h.split(chunk_rows), t.split(chunk_rows)):
        total = total + checkpoint(_nll_chunk, hc, weight, tc, ignore_index, use_reentrant=False)
    return total, (t != ignore_index).sum()


def _logprob_chunk(h, weight, tokens, temperature: float, entropy: bool):
    z = F.linear(h, weight).float() / temperature  # (n, V) fp32
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not entropy:
        return logp
    return logp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)  # H = lse - E_p[z]


class _TokenLogprobs(torch.autograd.Function):
    """log p(token) per row of softmax(h @ weight.T / T), a chunk of rows at a time, through the kernels
    above: the forward keeps one number per row, its log-sum-exp; the backward recomputes each chunk's
    logits (as activation checkpointing does) and writes their gradient over them in one pass. Against the
    checkpointed PyTorch form, the same matmuls and one pass over each chunk's logits instead of a dozen."""

    @staticmethod
    def forward(ctx, h, weight, tokens, temperature: float, chunk_rows: int):
        dt = _matmul_dtype(h)
        w = weight.to(dt)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
        logp = torch.empty_like(lse)
        for s in range(0, h.shape[0], chunk_rows):
            z = F.linear(h[s:s + chunk_rows].to(dt), w)  # (n, V)
            lse[s:s + chunk_rows], zt = token_lse(z, tokens[s:s + chunk_rows], temperature)
            logp[s:s + chunk_rows] = zt - lse[s:s + chunk_rows]
        ctx.save_for_backward(h, weight, tokens, lse)
        ctx.dt, ctx.temperature, ctx.chunk_rows = dt, temperature, chunk_rows
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        h, weight, tokens, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        w, n = weight.to(ctx.dt), ctx.chunk_rows
        dh = torch.empty_like(h) if need_h else None  # (N, d)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, d)
        # d logp_i / d z_i = (onehot(t_i) - p_i) / T, so the gradient is scale_i * (p_i - onehot) with this scale:
        scale = -dlogp.float() / ctx.temperature  # (N,)
        for s in range(0, h.shape[0], n):
            hc = h[s:s + n].to(ctx.dt)
            g = softmax_grad_(F.linear(hc, w), tokens[s:s + n], lse[s:s + n], scale[s:s + n], ctx.temperature)
            if need_h:
                dh[s:s + n] = g @ w  # (n, d)
            if need_w:
                dw.add_(g.T @ hc)  # (V, d), accumulated in fp32
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def chunked_token_logprobs(hidden, weight, tokens, temperature: float = 1.0, chunk_rows: int = 1024,
                           entropy: bool = False):
    """hidden (B, T, d), weight (V, d), tokens (B, T) -> log p(token) (B, T) fp32 under
    softmax(hidden @ weight.T / temperature), and with entropy=True also the entropies (B, T) fp32 of
    that distribution. The same as log_softmax(logits / T).gather(tokens), with gradients. Without
    entropies, where the kernels above run (CUDA) and the weight is a plain tensor (not an
    FSDP-sharded one): _TokenLogprobs."""
    B, T = tokens.shape
    h = hidden.reshape(B * T, hidden.shape[-1])  # (B*T, d)
    if not entropy and type(weight) in (torch.Tensor, nn.Parameter) and kernel_runs_on(h):
        return _TokenLogprobs.apply(h, weight, tokens.reshape(-1), temperature, chunk_rows).view(B, T)
    parts = [checkpoint(_logprob_chunk, hc, weight, tc, temperature, entropy, use_reentrant=False)
             for hc, tc in zip(h.split(chunk_rows), tokens.reshape(-1).split(chunk_rows))]
    if not entropy:
        return torch.cat(parts).view(B, T)  # (B, T)
    return torch.cat([p[0] for p in parts]).view(B, T), torch.cat([p[1] for p in parts]).view(B, T)
