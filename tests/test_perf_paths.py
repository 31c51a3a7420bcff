"""The fast paths of model.py against their plain forms: fused projections and the HF layout, the
static-shape decode step, the chunked losses; and bench.py --small end to end."""

import json
import math
import os
import re
import subprocess
import sys
import unittest.mock

import pytest

import torch
import torch.nn.functional as F

import model as M
from cross_entropy import chunked_cross_entropy, chunked_token_logprobs
from model import ModelConfig, Transformer, decode_step, generate, hf_to_ours, ours_to_hf

from test_model import randomize, tiny  # the same random tiny configs as the model tests

ROOT = M.Path(M.__file__).resolve().parent


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Fused projections <-> the HF layout


@pytest.mark.parametrize("mtype,kw", [("llama", {}), ("qwen2", dict(tied=False)), ("qwen3", dict(head_dim=16)),
                                      ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1))])
def test_hf_layout_round_trip(mtype, kw):
    import transformers
    m = randomize(Transformer(tiny(mtype, **kw)), 1)
    hf_state = ours_to_hf(m.state_dict(), m.config)
    d = m.config.to_hf()
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(d.pop("model_type"), **d))
    assert set(hf_state) == set(hf.state_dict())  # exactly HF's names
    assert all(hf_state[k].shape == v.shape for k, v in hf.state_dict().items())
    back = hf_to_ours(hf_state)
    assert set(back) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k
    a = m.model.layers[0].self_attn
    q_rows = a.H * a.D
    assert torch.equal(hf_state["model.layers.0.self_attn.q_proj.weight"], a.qkv_proj.weight[:q_rows])
    assert torch.equal(hf_state["model.layers.0.mlp.up_proj.weight"],
                       m.model.layers[0].mlp.gate_up_proj.weight[m.config.intermediate_size:])


def test_optimizer_state_saved_unfused_loads_fused():
    """AdamW over the HF-layout parameters, stepped with the split gradients, is the same optimizer as AdamW
    over the fused ones: its state, converted, equals the fused optimizer's."""
    m = randomize(Transformer(tiny("qwen2", tied=False)), 7)
    named = dict(m.named_parameters())
    split = {k: torch.nn.Parameter(v.detach().clone()) for k, v in ours_to_hf(named, m.config).items()}

    def adamw(params):
        params = list(params)
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)

    opt, opt_split = adamw(m.parameters()), adamw(split.values())
    for step in range(2):
        grads = {k: rand(*v.shape, seed=100 * step + i) for i, (k, v) in enumerate(named.items())}
        for k, p in named.items():
            p.grad = grads[k]
        for k, g in ours_to_hf(grads, m.config).items():
            split[k].grad = g.clone()
        opt.step(), opt_split.step()
    fresh = adamw(m.parameters())
    fresh.load_state_dict(M.fuse_optimizer_state(opt_split.state_dict(), fresh, m))
    want, got = opt.state_dict(), fresh.state_dict()
    assert M.fuse_optimizer_state(want, fresh, m) is want  # already fused: unchanged
    assert want["param_groups"] == got["param_groups"]
    for i, s in want["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(got["state"][i][k], v, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The static-shape decode step: the full cache with a mask gives what the sliced cache gave


@pytest.mark.parametrize("mtype,kw", [("llama", dict(tied=False)), ("qwen3", dict(head_dim=16)), ("qwen2", {})])
def test_full_cache_decode_equals_sliced(mtype, kw):
    m = randomize(Transformer(tiny(mtype, **kw)), 3).eval()
    prompts = [[5, 9, 13, 2, 40, 7], [7, 3], [11, 12, 13, 14]]
    sliced = generate(m, prompts, 14, temperature=0.0, static=False)
    full = generate(m, prompts, 14, temperature=0.0, static=True)
    assert torch.equal(full.tokens, sliced.tokens)
    torch.testing.assert_close(full.logprobs, sliced.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.entropies, sliced.entropies, atol=1e-5, rtol=1e-5)
    assert m.caches is None
    g = torch.Generator().manual_seed(8)
    sampled = [generate(m, prompts, 14, temperature=0.8, stop_ids={3}, static=s, generator=g.manual_seed(8))
               for s in (False, True)]
    assert torch.equal(sampled[0].tokens, sampled[1].tokens) and torch.equal(sampled[0].mask, sampled[1].mask)
    again = generate(m, prompts, 14, temperature=0.0, compile=True)  # ignored on the CPU
    assert torch.equal(again.tokens, sliced.tokens)


def test_decode_step_traces_as_one_graph():
    """decode_step compiles with fullgraph=True (no graph break, no data-dependent shape) and, compiled,
    writes the cache and returns the eager step's logits. aot_eager: the graph without inductor's codegen."""
    torch._dynamo.reset()
    m = randomize(Transformer(tiny("qwen3", head_dim=16)), 4).eval()
    prompts = [[5, 9, 13, 2], [7, 3]]
    ids, pmask = M.left_pad(prompts, 0)
    B, P, S = 2, 4, 12
    key_mask = torch.cat([pmask.bool(), torch.ones(B, S - P, dtype=torch.bool)], 1)
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)
    step = torch.compile(decode_step, backend="aot_eager", fullgraph=True)
    outs = {}
    with torch.no_grad():
        for name, fn in (("eager", decode_step), ("compiled", step)):
            m.setup_cache(B, S)
            first = m(ids, position_ids=pos, cache_start=0, key_mask=key_mask[:, :P], last_only=True)[:, -1]
            tok, nxt, slot, seq = first.argmax(-1), pos[:, -1:] + 1, torch.tensor(P), []
            for _ in range(5):
                logits = fn(m, tok[:, None], nxt, slot, key_mask)
                assert logits.shape == (B, m.config.vocab_size) and logits.dtype == torch.float32
                seq.append(logits)
                tok, nxt, slot = logits.argmax(-1), nxt + 1, slot + 1
            outs[name] = (torch.stack(seq, 1), m.caches[1].k.clone())
    torch.testing.assert_close(outs["compiled"][0], outs["eager"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["compiled"][1], outs["eager"][1], atol=1e-6, rtol=1e-6)
    assert outs["eager"][1][:, :, P + 5:].abs().sum() == 0  # slots past the last step were never written
    torch._dynamo.reset()


def test_compiled_generate_loop_samples_what_the_eager_step_samples(monkeypatch):
    """generate(compile=True)'s loop (the forward and the sampling in one compiled step, the race's noise drawn
    outside it), run on the CPU with an aot_eager compile: the same tokens and log-probs as the same loop
    with the step uncompiled; greedy, the tokens of the eager generate; sampled log-probs and entropies
    those of a full-forward recomputation; and temperature / top_p never become graph inputs, so a second
    temperature does not turn them into 0-d CPU tensors of every later graph (the CUDA graph cannot take them)."""
    torch._dynamo.reset()
    graph_inputs = []

    def backend(gm, inputs):
        graph_inputs.append(inputs)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    m = randomize(Transformer(tiny("qwen3", heads=4, kv=2, head_dim=16)), 6).eval()
    prompts = [[5, 9, 13, 2, 40, 7], [7, 3], [11, 12, 13, 14]]
    monkeypatch.setattr(M, "COMPILE_DEVICES", ("cuda", "cpu"))
    runs = {}
    for name, step in (("plain", M.decode_sample_step),
                       ("compiled", torch.compile(M.decode_sample_step, backend=backend, fullgraph=True))):
        monkeypatch.setattr(M, "compiled_decode_sample_step", lambda step=step: step)
        runs[name] = [generate(m, prompts, 12, temperature=t, stop_ids={3}, compile=True,
                               generator=torch.Generator().manual_seed(5)) for t in (0.0, 0.8, 1.3)]
        m.caches = None
    for plain, comp in zip(runs["plain"], runs["compiled"]):
        assert torch.equal(plain.tokens, comp.tokens) and torch.equal(plain.mask, comp.mask)
        torch.testing.assert_close(comp.logprobs, plain.logprobs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(comp.entropies, plain.entropies, atol=1e-6, rtol=1e-6)
    greedy = generate(m, prompts, 12, temperature=0.0, stop_ids={3})
    assert torch.equal(runs["compiled"][0].tokens, greedy.tokens)
    g = runs["compiled"][2]  # temperature 1.3: recompute every sampled token's log-prob and entropy
    assert g.mask.sum() > 12 and not torch.equal(g.tokens, greedy.tokens)
    seqs = [p + g.tokens[i][g.mask[i].bool()].tolist() for i, p in enumerate(prompts)]
    ids, mask = M.left_pad(seqs, 0)
    with torch.no_grad():
        logp = (m(ids, attention_mask=mask).float() / 1.3).log_softmax(-1)
    for i, p in enumerate(prompts):
        n, off = int(g.mask[i].sum()), ids.shape[1] - len(seqs[i]) + len(p)
        lp = logp[i, off - 1:off - 1 + n]  # (n, V): the distributions the n tokens were drawn from
        torch.testing.assert_close(lp.gather(-1, g.tokens[i, :n, None]).squeeze(-1), g.logprobs[i, :n], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(-(lp.exp() * lp).sum(-1), g.entropies[i, :n], atol=1e-5, rtol=1e-5)
    assert len(graph_inputs) == 3  # one graph per temperature (greedy has no noise)
    for inputs in graph_inputs:
        zero_d = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() == 0]
        assert all(not x.is_floating_point() for x in zero_d), [x.dtype for x in zero_d]  # only the slot index
    torch._dynamo.reset()


def test_decode_compile_options_make_batch_one_matmuls_inductor_reductions():
    """DECODE_COMPILE_OPTIONS are Inductor settings that exist (patch refuses unknown names), and with them on,
    Inductor rewrites a one-row matmul (every projection of a batch-1 decode step) as its own multiply-and-sum
    on a GPU; without them it leaves it to cuBLAS. Meta tensors stand in for the GPU (the rewrite is off on
    CPU tensors, and this machine has no GPU)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.decomposition import mm
    x, w = torch.empty(1, 64, device="meta"), torch.empty(64, 96, device="meta")
    assert mm(x, w) is NotImplemented
    with inductor_config.patch(**M.DECODE_COMPILE_OPTIONS):
        out = mm(x, w)
        assert out is not NotImplemented and out.shape == (1, 96)
        assert mm(torch.empty(8, 64, device="meta"), w) is NotImplemented  # batch 8: still cuBLAS


def test_setup_cache_reuses_and_clears_buffers():
    m = Transformer(tiny())
    m.setup_cache(2, 16)
    k = m.caches[0].k
    k.fill_(3.0)
    m.setup_cache(2, 16)
    assert m.caches[0].k is k and k.abs().sum() == 0
    m.setup_cache(3, 16)
    assert m.caches[0].k is not k and m.caches[0].k.shape[0] == 3


# ------------------------------------------------------------------------------------------------
# Chunked losses: equal to the full-logits forms, values and gradients


def test_chunked_cross_entropy_matches_full_logits():
    B, T, d, V = 3, 37, 48, 101
    hidden = rand(B, T, d, seed=10).requires_grad_()
    weight = (rand(V, d, seed=11) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(12))
    targets[0, :20] = -100  # ignored rows, one whole 16-row chunk among them
    targets[2, 5] = -100
    total, count = chunked_cross_entropy(hidden, weight, targets, chunk_rows=16)
    assert total.dtype == torch.float32 and total.dim() == 0 and count.item() == (targets != -100).sum().item()
    loss = total / count
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    assert abs(loss.item() - ref.item()) <= 1e-5
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
    assert gh[0, :20].abs().sum() == 0  # ignored rows get no gradient


def test_chunked_token_logprobs_and_entropy_match_log_softmax():
    B, T, d, V = 2, 29, 40, 97
    hidden = rand(B, T, d, seed=20).requires_grad_()
    weight = (rand(V, d, seed=21) * 0.3).requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(22))
    temp = 0.7
    lp, ent = chunked_token_logprobs(hidden, weight, tokens, temperature=temp, chunk_rows=10, entropy=True)
    assert lp.shape == ent.shape == (B, T) and lp.dtype == ent.dtype == torch.float32
    c1, c2 = rand(B, T, seed=23), rand(B, T, seed=24)
    gh, gw = torch.autograd.grad((lp * c1).sum() + (ent * c2).sum(), (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = torch.log_softmax((h2 @ w2.T) / temp, -1)
    ref_lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    rh, rw = torch.autograd.grad((ref_lp * c1).sum() + (ref_ent * c2).sum(), (h2, w2))
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
    only = chunked_token_logprobs(hidden, weight, tokens, temperature=temp, chunk_rows=1000)
    torch.testing.assert_close(only, lp.detach(), atol=1e-6, rtol=1e-6)  # one chunk: the same numbers


def test_model_hidden_only_forward_and_chunked_loss_equal_full_logits_loss():
    for tied in (True, False):
        m = randomize(Transformer(tiny(tied=tied)), 5)
        assert (m.lm_head_weight is m.model.embed_tokens.weight) == tied
        ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(6))
        am = torch.ones_like(ids)
        am[1, :4] = 0
        logits, h = m(ids, attention_mask=am, return_hidden=True)
        h_only = m(ids, attention_mask=am, logits=False)
        torch.testing.assert_close(h_only, h, atol=0, rtol=0)
        targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        ref_grads = torch.autograd.grad(ref, list(m.parameters()))
        for fused in (False, True):  # tied: the fused path's dweight joins the embedding's own gradient
            total, n = chunked_cross_entropy(h_only[:, :-1], m.lm_head_weight, targets, chunk_rows=8, fused=fused)
            grads = torch.autograd.grad(total / n, list(m.parameters()), retain_graph=True)
            assert abs((total / n).item() - ref.item()) <= 1e-5
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_losses_under_bf16_autocast():
    """Logits in bf16 (autocast), the log-sum-exp in fp32: close to the fp32 result, fp32 outputs."""
    B, T, d, V = 2, 16, 32, 64
    hidden, weight = rand(B, T, d, seed=30), rand(V, d, seed=31) * 0.3
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, n = chunked_cross_entropy(hidden, weight, tokens, chunk_rows=8)
        lp = chunked_token_logprobs(hidden, weight, tokens, chunk_rows=8)
    assert total.dtype == lp.dtype == torch.float32
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), tokens.flatten(), reduction="sum")
    assert abs(total.item() - ref.item()) / ref.item() < 2e-2
    torch.testing.assert_close(lp.sum() / n, -ref / n, atol=5e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------
# bench.py --small: every section, tables with finite ratios


def test_the_cpu_comparison_measures_both_sides_of_each_row(capsys):
    # `python bench.py` on a CPU (the CPU table of docs/PERFORMANCE.md), at sizes that take seconds.
    import bench
    rows = bench.cpu_comparison(bench.BenchConfig(batch=2, seq=16, sample_batch=2, prompt=4, new_tokens=3, repeats=1),
                                "cpu")
    assert [name.split(" ")[0] for name, *_ in rows] == ["train", "sampling", "same,"], rows
    assert all(math.isfinite(x) and x > 0 for _, a, b in rows for x in (a, b)), rows
    assert capsys.readouterr().out.count("x |") == 3


def test_bench_small_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # test_attention sets it
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--small", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout
    for n in (1, 2, 3, 4):
        assert re.search(rf"^### {n}\. ", text, re.M), text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    ratios = [line.split("|")[4].strip() for line in rows]
    numeric = [float(x.rstrip("x")) for x in ratios if x.endswith("x")]
    assert len(numeric) >= 6 and all(math.isfinite(x) and x > 0 for x in numeric), ratios
    assert "error" not in text.lower(), text
    saved = json.loads(out.read_text())
    assert [s["section"] for s in saved["sections"]] == [1, 2, 3, 4]
    assert saved["markdown"].count("| figure") == 4


def test_bench_gpu_checks_pass_on_the_cpu_through_their_seams(monkeypatch):
    """bench.py's GPU-only correctness checks (fused loss and token log-probs against their checkpointed
    forms; greedy tokens at batch 3 and 1, and sampled tokens, eager against compiled) run here with their
    CUDA gate lifted, on CPU tensors, generate's compiled path through a plain dynamo trace: a mistake in a
    check's own code shows here, not on a lent GPU."""
    import bench
    b = bench.Bench("cpu", bench.SMALL, 0)
    b.cuda = True  # the checks' gate only: their tensors stay on b.device
    monkeypatch.setattr(M, "COMPILE_DEVICES", ("cuda", "cpu"))
    step = torch.compile(M.decode_sample_step, backend="eager", fullgraph=True)
    monkeypatch.setattr(M, "compiled_decode_sample_step", lambda: step)
    torch._dynamo.reset()
    bench.check_greedy_compiled(b)
    model = randomize(Transformer(tiny("llama", heads=4, kv=2, head_dim=16)), 9).train()
    ids = torch.randint(1, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    bench.check_fused_loss(b, model, ids)
    assert [name for name, _, _ in b.checks] == [
        "greedy tokens eager == compiled decode step", "sampled tokens eager == compiled, same seed",
        "fused loss (Triton cross-entropy kernel) == checkpointed loss",
        "token log-probs (Triton kernels) == checkpointed PyTorch form"]
    assert all(ok is True for _, ok, _ in b.checks), b.checks
    assert "B1" in b.checks[0][2] and "[True, True, True, True]" in b.checks[0][2]


def test_bench_sections_run_in_the_order_given_and_bad_ones_are_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "bench.py"), "--small", *a], capture_output=True,
                                    text=True, cwd=ROOT, timeout=600, env=env)
    prof = tmp_path / "prof.txt"
    r = run("--sections", "3,1", "--profile", str(prof))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    heads = re.findall(r"^### (\d)\. ", r.stdout, re.M)
    assert heads == ["3", "1"], heads
    # --profile: one table per side of the training step, each naming the matmuls it spent time in
    tables = prof.read_text().split("## ")[1:]
    assert [t.split(",")[1].strip() for t in tables] == ["ours eager (llama-1b", "HF eager (llama-1b"], tables
    assert all("aten::mm" in t for t in tables)
    r = run("--sections", "2,x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--sections 2,x" in r.stderr, r.stderr


def test_fused_cross_entropy_equals_the_checkpointed_one_and_full_logits():
    # fused=True computes both gradients in the forward (CUDA's path); checked here against F.cross_entropy
    # on full logits, with ignored rows, a last chunk shorter than the others, and a frozen weight.
    B, T, d, V = 3, 37, 48, 101
    hidden = rand(B, T, d, seed=40).requires_grad_()
    weight = (rand(V, d, seed=41) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(42))
    targets[0, :20] = -100
    targets[2, 5] = -100
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    total, count = chunked_cross_entropy(hidden, weight, targets, chunk_rows=16, fused=True)
    assert total.grad_fn is not None and "LinearCrossEntropy" in type(total.grad_fn).__name__
    gh, gw = torch.autograd.grad(total / count, (hidden, weight))
    assert abs((total / count).item() - ref.item()) <= 1e-5
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
    assert gh[0, :20].abs().sum() == 0
    # frozen weight: only dh; no gradient wanted: the plain forward, same loss
    (gh2,) = torch.autograd.grad(chunked_cross_entropy(hidden, weight.detach(), targets, 16, fused=True)[0] / count,
                                 (hidden,))
    torch.testing.assert_close(gh2, rh, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = chunked_cross_entropy(hidden, weight, targets, chunk_rows=16, fused=True)[0]
    assert plain.grad_fn is None and abs(plain.item() - total.item()) <= 1e-4
    # under bf16 autocast: within bf16 rounding of the checkpointed path's gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = torch.autograd.grad(chunked_cross_entropy(hidden, weight, targets, 16, fused=True)[0] / count,
                                (hidden, weight))
        b = torch.autograd.grad(chunked_cross_entropy(hidden, weight, targets, 16)[0] / count, (hidden, weight))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and ((x - y).norm() / y.norm()).item() < 2e-2


def test_grouped_sdpa_equals_sdpa_with_gqa_and_traces_as_one_graph():
    # The CUDA path for a masked GQA attention (decode steps, padded batches): query heads folded into the
    # query length instead of SDPA's enable_gqa (which, masked, takes the math kernel on CUDA).
    sdpa = F.scaled_dot_product_attention
    for B, H, K, T, S, left in ((2, 8, 2, 1, 19, (0, 7)), (3, 6, 2, 7, 30, (4, 0, 11)), (2, 8, 1, 16, 16, (3, 0)),
                                (1, 4, 4, 5, 9, (2,))):
        g = torch.Generator().manual_seed(B * 100 + T)
        q, k, v = (torch.randn(B, h, n, 16, generator=g) for h, n in ((H, T), (K, S), (K, S)))
        key_mask = torch.ones(B, S, dtype=torch.bool)
        for b, n in enumerate(left):
            key_mask[b, :n] = False
        mask = M.causal_mask(key_mask, S - T, T)  # (B, 1, T, S), the model's own
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)
        torch.testing.assert_close(M.grouped_sdpa(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(M.grouped_sdpa, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
        # CUDA's fused kernels may hand back (B, K, G*T, D) laid out as (B, G*T, K, D): the result must not care
        with unittest.mock.patch.object(M.F, "scaled_dot_product_attention",
                                        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2)):
            torch.testing.assert_close(M.grouped_sdpa(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
    per_head = torch.rand(B, H, T, S, generator=g) > 0.3  # a mask per query head: not folded, still right
    per_head[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=per_head, enable_gqa=H != K)
    torch.testing.assert_close(M.grouped_sdpa(q, k, v, per_head), ref, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_the_mask_prepared_once_per_forward_changes_no_bit():
    """sdpa_mask (the additive mask made once per forward, folded for grouped_sdpa where sdpa() folds) gives
    bit for bit what SDPA's own per-call conversion of the bool mask gives: through sdpa() and grouped_sdpa()
    (T = 1 and T > 1, GQA or not, a cache length that is no multiple of 16, fp32 and bf16), and through the
    model (logits of a left-padded batch and of cached decode steps, against the model with the bool mask)."""
    for B, H, K, T, S, left, dtype in ((2, 8, 2, 1, 19, (0, 7), torch.float32), (3, 6, 2, 7, 30, (4, 0, 11), torch.bfloat16),
                                       (2, 4, 4, 5, 37, (2, 0), torch.float32)):
        g = torch.Generator().manual_seed(B * 10 + T)
        q, k, v = (torch.randn(B, h, n, 16, generator=g).to(dtype) for h, n in ((H, T), (K, S), (K, S)))
        key_mask = torch.ones(B, S, dtype=torch.bool)
        for b, n in enumerate(left):
            key_mask[b, :n] = False
        mask = M.causal_mask(key_mask, S - T, T)  # (B, 1, T, S)
        flat, folded = M.sdpa_mask(mask, 1, dtype), M.sdpa_mask(mask, H // K, dtype)
        assert flat.shape == (B, 1, T, S) and folded.shape == (B, 1, H // K * T, S) and flat.dtype == dtype
        assert flat.stride(-1) == 1 and flat.stride(-2) % 16 == 0  # aligned rows: no copy in the kernel
        assert torch.equal(flat == 0, mask) and torch.equal(flat[~mask], torch.full_like(flat[~mask], float("-inf")))
        assert torch.equal(M.sdpa(q, k, v, flat), M.sdpa(q, k, v, mask))
        if H != K:
            assert torch.equal(M.grouped_sdpa(q, k, v, folded), M.grouped_sdpa(q, k, v, mask))
            traced = torch.compile(M.grouped_sdpa, backend="aot_eager", fullgraph=True)
            assert torch.equal(traced(q, k, v, folded), M.grouped_sdpa(q, k, v, mask))
    m = randomize(Transformer(tiny("llama", heads=4, kv=2, head_dim=16)), 12).eval()
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, :4] = 0
    am[2, :7] = 0
    prompts = [[5, 9, 13, 2, 40, 7], [7, 3], [11, 12, 13, 14]]
    outs = []
    for prepared in (True, False):
        with unittest.mock.patch.object(M, "sdpa_mask", M.sdpa_mask if prepared else lambda mask, fold, dtype: mask), \
                torch.no_grad():
            logits = m(ids, attention_mask=am)
            gen = generate(m, prompts, 10, temperature=0.7, generator=torch.Generator().manual_seed(2), static=True)
        outs.append((logits, gen.tokens, gen.logprobs))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    torch._dynamo.reset()


def test_bench_keeps_the_finished_sections_when_a_run_is_cut_short(tmp_path, monkeypatch):
    # On a lent GPU the call has a time limit: what was measured before the kill must be on disk.
    import bench

    def killed(b):
        raise KeyboardInterrupt  # not an Exception: like the signal of a time limit, it ends the run

    monkeypatch.setitem(bench.SECTIONS, 4, killed)
    out = tmp_path / "bench.md"
    with pytest.raises(KeyboardInterrupt):
        bench.run_sections(bench.BenchConfig(small=True, sections="3,4", out=str(out)), "cpu")
    text = out.read_text()
    assert re.search(r"^### 3\. ", text, re.M) and "| figure" in text and "### 4." not in text, text
