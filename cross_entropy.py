"""
The cross-entropy of a chunk of logits and its gradient, in one Triton kernel, and the same in plain PyTorch.

model.chunked_cross_entropy(fused=True) (what sft.py and bench.py train with on CUDA) computes, one chunk of n
rows at a time, the logits z = h W^T (n, V) and then needs two things of them before they are freed:

    the summed NLL           sum_i  lse_i - z[i, t_i]             lse_i = log sum_v exp z[i, v]
    its gradient wrt z       softmax(z_i) - onehot(t_i)            (a zero row where t_i is ignore_index)

from which two matmuls give the gradients of h and W. Written as PyTorch ops (`reference` below) that is a
dozen passes over the (n, V) logits with fp32 copies: the upcast, the log-sum-exp, the subtraction, the exp,
the one-hot, the mask, the cast back. At llama-1b's vocabulary (128,256) and 1024 rows, about 6 GB of memory
traffic per chunk, 16 ms of every training step on an H100.

The kernel: one program per row, two passes over the row. Pass 1 reads the logits once and keeps, per lane, a
running max m and a running sum l of exp(z - m) (the online softmax of FlashAttention, here with no values to
carry); the lanes then combine into the row's lse. Pass 2 reads them again and writes exp(z - lse) - [v == t]
over the logits themselves, in their dtype. Two reads and one write of the logits in bf16: about 0.8 GB per such
chunk. All arithmetic is fp32; the gradient is rounded once, to the dtype of the logits, as the reference does.

Runs on CUDA tensors when Triton is installed, and on CPU tensors under TRITON_INTERPRET=1 (the tests);
everything else takes the reference. Importing this file never needs Triton.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language so the kernel signature below still parses
        constexpr = None

jit = triton.jit if triton is not None else (lambda fn: fn)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit below, once: how the kernel was built
BLOCK = 4096  # logits per program per loop step on a GPU (the interpreter's tests pass small blocks)


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


@jit
def _cross_entropy_kernel(Z, TARGETS, LOSS, stride, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride
    t = tl.load(TARGETS + row)
    keep = t != ignore_index
    # 1. The row's log-sum-exp, online: per lane a running max m and a running sum l of exp(z - m).
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane past V: avoid -inf - -inf
        l = l * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(l * tl.exp(m - m_row), 0))
    z_t = tl.load(z_row + tl.where(keep, t, 0)).to(tl.float32)  # read before pass 2 overwrites it
    tl.store(LOSS + row, tl.where(keep, lse - z_t, 0.0))
    # 2. The gradient softmax - onehot, over the logits.
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        z = tl.load(z_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - tl.where(offs == t, 1.0, 0.0)
        tl.store(z_row + offs, tl.where(keep, g, 0.0).to(Z.dtype.element_ty), mask=offs < V)


def kernel_runs_on(z) -> bool:
    """On CUDA tensors when the kernel was built for the GPU; on CPU tensors when it was built for Triton's
    interpreter (TRITON_INTERPRET=1 when this file was imported)."""
    return triton is not None and z.is_cuda != INTERPRETED


def cross_entropy_(z, targets, ignore_index: int = -100, block: int = BLOCK):
    """As `reference`, but the gradient is written over z (whose values are then gone) by the kernel where it
    runs: -> (summed NLL, fp32 0-d; the gradient, which is z). Elsewhere the reference's result."""
    if not (kernel_runs_on(z) and z.dim() == 2 and z.stride(-1) == 1):
        return reference(z, targets, ignore_index)
    n, V = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    block = min(block, triton.next_power_of_2(V))
    _cross_entropy_kernel[(n,)](z, targets, loss, z.stride(0), V, ignore_index, BLOCK=block,
                                num_warps=8 if z.is_cuda else 1)
    return loss.sum(), z
