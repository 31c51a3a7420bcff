"""cross_entropy.py: the Triton kernel (run on the CPU by Triton's interpreter) against the plain-PyTorch
reference, and the reference, through cross_entropy.chunked_cross_entropy(fused=True), against F.cross_entropy."""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is jitted, i.e. when cross_entropy is imported

import pytest
import torch
import torch.nn.functional as F

import cross_entropy

cross_entropy = importlib.reload(cross_entropy)  # in case it was imported before TRITON_INTERPRET was set
import model as M


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """Every test here runs the kernels on the CPU (elsewhere in the suite the CPU takes the PyTorch form)."""
    monkeypatch.setattr(cross_entropy, "CPU_INTERPRETER", True)


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


@pytest.mark.parametrize("n,V,block", [(5, 37, 16), (3, 200, 64), (2, 1, 16)])
def test_lse_and_gradient_kernels_at_a_temperature_equal_pytorch(n, V, block, monkeypatch):
    g = torch.Generator().manual_seed(V)
    z = 3 * torch.randn(n, V, generator=g)
    t = torch.randint(0, V, (n,), generator=g)
    scale = torch.randn(n, generator=g)
    got = [cross_entropy.token_lse(z, t, 0.7, block=block)]
    got.append(cross_entropy.softmax_grad_(z.clone(), t, got[0][0], scale, 0.7, block=block))
    monkeypatch.setattr(cross_entropy, "CPU_INTERPRETER", False)  # the PyTorch forms
    assert not cross_entropy.kernel_runs_on(z)
    want = [cross_entropy.token_lse(z, t, 0.7)]
    want.append(cross_entropy.softmax_grad_(z.clone(), t, want[0][0], scale, 0.7))
    x = z / 0.7  # and the formulas themselves
    torch.testing.assert_close(want[0][0], torch.logsumexp(x, -1))
    torch.testing.assert_close(want[0][1], x.gather(-1, t[:, None]).squeeze(-1))
    onehot = F.one_hot(t, V).float()
    torch.testing.assert_close(want[1], scale[:, None] * (torch.softmax(x, -1) - onehot))
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_token_logprobs_through_the_kernels_equal_log_softmax():
    # cross_entropy.chunked_token_logprobs (ppo.py's scoring) through _TokenLogprobs and the kernels: log-probs and both
    # gradients against log_softmax(logits / T).gather on full logits; chunks of 6 rows over 15 (a partial one).
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(97, 24, generator=g)).requires_grad_()
    tokens = torch.randint(0, 97, (3, 5), generator=g)
    logp = cross_entropy.chunked_token_logprobs(hidden, weight, tokens, 0.8, chunk_rows=6)
    want = ((hidden @ weight.T) / 0.8).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    w_out = torch.randn(3, 5, generator=g)  # an arbitrary upstream gradient
    got = torch.autograd.grad((logp * w_out).sum(), (hidden, weight))
    ref = torch.autograd.grad((want * w_out).sum(), (hidden, weight))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # scoring without a graph (the reference model's forward)
        torch.testing.assert_close(cross_entropy.chunked_token_logprobs(hidden, weight, tokens, 0.8, chunk_rows=6), want.detach(),
                                   atol=1e-5, rtol=1e-5)


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
    # cross_entropy.chunked_cross_entropy(fused=True) with the kernel doing each chunk (as on CUDA): loss and both
    # gradients against F.cross_entropy on the full logits; chunks of 7 rows over 20 (a partial last chunk).
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 24, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(97, 24, generator=g)).requires_grad_()
    targets = torch.randint(0, 97, (4, 5), generator=g)
    targets[1, 2:] = -100
    total, count = cross_entropy.chunked_cross_entropy(hidden, weight, targets, chunk_rows=7, fused=True)
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
types = {"Z": "*bf16", "TARGETS": "*i64", "LSE": "*fp32", "ZT": "*fp32", "SCALE": "*fp32", "stride": "i32",
         "V": "i32", "inv_temp": "fp32", "BLOCK": "constexpr"}
for fn in (C._lse_kernel, C._grad_kernel):
    sig = {a: types[a] for a in fn.arg_names}
    div16 = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in ("inv_temp", "BLOCK")}
    k = triton.compile(ASTSource(fn, sig, {"BLOCK": C.BLOCK}, div16), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump"),
                                "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    print(fn.__name__, re.search(r"REG:\\d+ STACK:\\d+", usage).group(0),
          "vector loads", len(re.findall(r"ld\\.global\\.v4", k.asm["ptx"])))
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
    rows = re.findall(r"^(_\w+) REG:(\d+) STACK:(\d+) vector loads (\d+)$", r.stdout, re.M)
    assert [name for name, *_ in rows] == ["_lse_kernel", "_grad_kernel"], r.stdout
    for name, regs, stack, vec in rows:
        assert 0 < int(regs) <= 255 and int(stack) == 0 and int(vec) > 0, r.stdout
