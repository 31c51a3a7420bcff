"""cross_entropy.py: the Triton kernel (run on the CPU by Triton's interpreter) against the plain-PyTorch
reference, and the reference, through model.chunked_cross_entropy(fused=True), against F.cross_entropy."""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is jitted, i.e. when cross_entropy is imported

import pytest
import torch
import torch.nn.functional as F

import cross_entropy

cross_entropy = importlib.reload(cross_entropy)  # in case it was imported before TRITON_INTERPRET was set
import model as M


@pytest.mark.parametrize("n,V,block,ignored", [(5, 37, 16, (0,)), (4, 130, 64, (1, 3)), (3, 64, 64, ()),
                                               (2, 1, 16, (1,)), (6, 300, 128, (0, 1, 2, 3, 4, 5))])
def test_kernel_equals_the_reference(n, V, block, ignored):
    # Several blocks per row with a partial last one (V not a multiple of block), one block, a vocab of 1,
    # ignored rows (gradient 0, no loss), every row ignored; logits with a wide spread, fresh each case.
    g = torch.Generator().manual_seed(n * 1000 + V)
    z = 4 * torch.randn(n, V, generator=g) + torch.randn(n, 1, generator=g) * 10
    t = torch.randint(0, V, (n,), generator=g)
    t[list(ignored)] = -100
    want_loss, want_grad = cross_entropy.reference(z, t)
    zz = z.clone()
    assert cross_entropy.kernel_runs_on(zz)
    loss, grad = cross_entropy.cross_entropy_(zz, t, block=block)
    assert grad.data_ptr() == zz.data_ptr()  # written over the logits
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
    assert (grad[list(ignored)] == 0).all()


def test_reference_is_the_formula():
    # The reference against F.cross_entropy and autograd: the NLL sum and its gradient wrt the logits.
    g = torch.Generator().manual_seed(7)
    z = (3 * torch.randn(6, 50, generator=g)).requires_grad_()
    t = torch.randint(0, 50, (6,), generator=g)
    t[2] = -100
    want = F.cross_entropy(z, t, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, z)
    loss, grad = cross_entropy.reference(z.detach(), t)
    torch.testing.assert_close(loss, want.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)


def test_fused_chunked_loss_through_the_kernel_equals_full_logits():
    # model.chunked_cross_entropy(fused=True) with the kernel doing each chunk (as on CUDA): loss and both
    # gradients against F.cross_entropy on the full logits; chunks of 7 rows over 20 (a partial last chunk).
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 24, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(97, 24, generator=g)).requires_grad_()
    targets = torch.randint(0, 97, (4, 5), generator=g)
    targets[1, 2:] = -100
    total, count = M.chunked_cross_entropy(hidden, weight, targets, chunk_rows=7, fused=True)
    gh, gw = torch.autograd.grad(total / count, (hidden, weight))
    want = F.cross_entropy((hidden @ weight.T).reshape(-1, 97), targets.reshape(-1), reduction="sum")
    wh, ww = torch.autograd.grad(want / count, (hidden, weight))
    torch.testing.assert_close(total, want.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gh, wh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, ww, atol=1e-6, rtol=1e-5)


BUILD = """
import os, re, subprocess, tempfile
import triton, triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cross_entropy as C
fn = C._cross_entropy_kernel
sig = {"Z": "*bf16", "TARGETS": "*i64", "LOSS": "*fp32", "stride": "i32", "V": "i32", "ignore_index": "i32",
       "BLOCK": "constexpr"}
div16 = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a != "ignore_index" and a != "BLOCK"}
k = triton.compile(ASTSource(fn, sig, {"BLOCK": C.BLOCK}, div16), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"]); f.flush()
    usage = subprocess.run([os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump"),
                            "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
print(re.search(r"REG:\\d+ STACK:\\d+", usage).group(0), "vector loads", len(re.findall(r"ld\\.global\\.v4", k.asm["ptx"])))
"""


def test_kernel_builds_for_hopper_without_spills_and_with_vector_loads():
    # Compiled for sm_90 by Triton's own compiler and ptxas, no GPU needed (as llama-1b's launch specialises:
    # pointers, the row stride and V = 128,256 divisible by 16): a kernel edit that no longer builds, spills or
    # loses its 16-byte loads fails here instead of on a lent GPU. Without TRITON_INTERPRET, which replaces it.
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    regs, stack, vec = map(int, re.search(r"REG:(\d+) STACK:(\d+) vector loads (\d+)", r.stdout).groups())
    assert 0 < regs <= 255 and stack == 0 and vec > 0, r.stdout
