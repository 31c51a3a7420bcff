"""
Softmax cross-entropy over a chunk of logits, forward and gradient, as two Triton kernels; and the same in
plain PyTorch, which the kernels are tested against.

The training losses never hold (B, T, V) logits: model.py makes them one chunk of n rows at a time,
z = h W^T (n, V), and needs, per row i with token t_i at temperature T,

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

Runs on CUDA tensors when Triton is installed, and in the tests on CPU tensors under TRITON_INTERPRET=1;
everything else takes the PyTorch form. Importing this file never needs Triton.
"""

import os

import torch

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
    """As `reference`, but the gradient is written over z (whose values are then gone) by the kernels where
    they run: -> (summed NLL, fp32 0-d; the gradient, which is z). Elsewhere the reference's result."""
    if not _launchable(z):
        return reference(z, targets, ignore_index)
    keep = targets != ignore_index
    t = torch.where(keep, targets, 0)
    lse, zt = token_lse(z, t, block=block)
    return torch.where(keep, lse - zt, 0.0).sum(), softmax_grad_(z, t, lse, keep.float(), block=block)
