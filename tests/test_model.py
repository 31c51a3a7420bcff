"""model.py against HF transformers: logits, greedy generation, KV cache, checkpoints both ways."""

import json
import subprocess
import sys

import pytest
import torch
import transformers  # the reference (requirements-dev.txt): a missing one fails the suite, never skips it

import model as M
from model import ModelConfig, Transformer, generate

ROOT = M.Path(M.__file__).resolve().parent


def tiny(model_type="llama", heads=4, kv=2, tied=True, **kw):
    base = dict(model_type=model_type, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)


def randomize(model, seed):
    """Fresh random values everywhere, norms and biases included (never the ones/zeros of init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] in (16, 32, 64) else 0.0))
    return model


CASES = [
    ("llama", dict(heads=4, kv=4, tied=True)),
    ("llama", dict(heads=4, kv=2, tied=False)),
    ("llama", dict(heads=8, kv=2, tied=True, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64))),
    ("llama", dict(heads=4, kv=1, tied=False, attention_bias=True)),
    ("qwen2", dict(heads=4, kv=2, tied=False)),
    ("qwen2", dict(heads=8, kv=2, tied=True)),
    ("qwen3", dict(heads=4, kv=1, tied=True, head_dim=32)),
    ("qwen3", dict(heads=4, kv=2, tied=False, head_dim=16)),
]


def ours_and_hf(tmp_path, mtype, kw, seed):
    ours = randomize(Transformer(tiny(mtype, **kw), attn="math"), seed).eval()
    ours.save_pretrained(tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    return ours, hf


def padded_batch(seed, B=3, T=12, V=97, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0  # left padding of different lengths
    mask[2, :1] = 0
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("mtype,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_logits_match_transformers(tmp_path, mtype, kw):
    ours, hf = ours_and_hf(tmp_path, mtype, kw, seed=len(str(kw)))
    ids, mask = padded_batch(seed=7)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_full = hf(ids).logits
        ref_pad = hf(ids, attention_mask=mask, position_ids=pos).logits
        for backend in ("math", "sdpa"):
            ours.attn = backend
            full = ours(ids)
            pad = ours(ids, attention_mask=mask)
            assert (full - ref_full).abs().max() <= 1e-5
            valid = mask.bool()
            assert (pad[valid] - ref_pad[valid]).abs().max() <= 1e-5
            # A left-padded row equals the same row computed alone without padding.
            alone = ours(ids[1:2, 5:])
            assert (pad[1, 5:] - alone[0]).abs().max() <= 1e-5


def test_hf_to_ours(tmp_path):
    for arch, cfg_cls in (("llama", transformers.LlamaConfig), ("qwen2", transformers.Qwen2Config),
                          ("qwen3", transformers.Qwen3Config)):
        torch.manual_seed(3)
        cfg = cfg_cls(vocab_size=89, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                      max_position_embeddings=128)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(tmp_path / arch)
        ours = Transformer.from_pretrained(tmp_path / arch).eval()
        assert ours.config.model_type == arch
        ids = torch.randint(0, 89, (2, 9))
        with torch.no_grad():
            assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_greedy_generate_matches_transformers(tmp_path):
    ours, hf = ours_and_hf(tmp_path, "llama", dict(heads=4, kv=2, tied=False), seed=11)
    prompts = [[5, 9, 13, 2, 40], [7, 3], [11, 12, 13, 14, 15, 16, 17]]
    ids, mask = M.left_pad(prompts, 0)
    hf.generation_config.pad_token_id = 0
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[:, ids.shape[1]:]
    for static in (False, True):  # the cache sliced to the current length, and decode_step over the whole cache
        g = generate(ours, prompts, max_new_tokens=10, temperature=0.0, pad_id=0, static=static)
        assert torch.equal(g.tokens, ref)
        assert g.mask.all() and not g.finished.any()


def test_kv_cache_decoding_equals_full_forward_and_logprobs_recompute():
    torch.manual_seed(0)
    m = randomize(Transformer(tiny("qwen3", heads=4, kv=2, head_dim=16)), 5).eval()
    prompts = [[5, 9, 13, 2, 40], [7, 3], [11, 12, 13]]
    T = 0.7
    g = generate(m, prompts, max_new_tokens=12, temperature=T, stop_ids={3, 4}, pad_id=0,
                 generator=torch.Generator().manual_seed(1))
    # Recompute every generated token's log-prob and entropy with one full forward over prompt+response.
    seqs = [p + g.tokens[i][g.mask[i].bool()].tolist() for i, p in enumerate(prompts)]
    ids, mask = M.left_pad(seqs, 0)
    with torch.no_grad():
        logits = m(ids, attention_mask=mask).float() / T
    logp = logits.log_softmax(-1)
    for i, p in enumerate(prompts):
        n = int(g.mask[i].sum())
        off = ids.shape[1] - len(seqs[i]) + len(p)  # column of the first generated token
        lp = logp[i, off - 1:off - 1 + n]  # (n, V) distributions that produced them
        tok = g.tokens[i, :n]
        assert torch.allclose(lp.gather(-1, tok[:, None]).squeeze(-1), g.logprobs[i, :n], atol=1e-5)
        ent = -(lp.exp() * lp).sum(-1)
        assert torch.allclose(ent, g.entropies[i, :n], atol=1e-5)
        if g.finished[i]:
            assert tok[-1].item() in (3, 4) and (g.tokens[i, n:] == 0).all()


def test_generate_keeps_no_graph_when_called_with_grad_enabled():
    # sft.py's in-run evaluation and ppo.py's rollouts call generate on a model that is training (grad on).
    # A graph kept across the decode steps held every step's activations: a 3M model ran a GPU out of memory.
    torch.manual_seed(0)
    m = randomize(Transformer(tiny("llama", heads=4, kv=2, head_dim=16)), 5).train()
    for static in (False, True):
        with torch.enable_grad():
            g = generate(m, [[5, 9, 13], [7, 3]], max_new_tokens=6, temperature=1.0, static=static,
                         generator=torch.Generator().manual_seed(1))
        assert not (g.logprobs.requires_grad or g.entropies.requires_grad), static


def test_rmsnorm_equals_transformers_in_every_dtype_it_meets():
    # fp32 input (the training residual stream under autocast) takes PyTorch's fused rms_norm; bf16 input (q/k
    # norms under autocast, bf16 weights when sampling) the explicit form in HF's order. Both against HF's module.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(3)
    for x_dtype, w_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.bfloat16, torch.bfloat16)):
        ours, hf = M.RMSNorm(48, 1e-6), LlamaRMSNorm(48, eps=1e-6)
        w = 1 + 0.3 * torch.randn(48, generator=g)
        for m in (ours, hf):
            m.weight.data = w.clone().to(w_dtype)
        x = (3 * torch.randn(4, 7, 48, generator=g)).to(x_dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ours, hf), xs)]
        assert ys[0].dtype == ys[1].dtype
        assert torch.equal(ys[0], ys[1]), (x_dtype, w_dtype, (ys[0] - ys[1]).abs().max())
        dy = torch.randn(ys[0].shape, generator=g).to(ys[0].dtype)
        grads = [torch.autograd.grad(y, (xi, m.weight), dy) for y, xi, m in zip(ys, xs, (ours, hf))]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rmsnorm_rounds_as_hf_when_autocast_runs_rms_norm_in_fp32(monkeypatch):
    # CUDA autocast puts rms_norm on its run-in-fp32 list: a bf16 input comes back fp32. HF still rounds the
    # normalised activations to bf16 before the gain; so must we. Here F.rms_norm is made to behave that way.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm",
                        lambda x, shape, weight=None, eps=None: real(x.float(), shape, weight, eps))
    g = torch.Generator().manual_seed(4)
    ours, hf = M.RMSNorm(48, 1e-6), LlamaRMSNorm(48, eps=1e-6)
    for m in (ours, hf):
        m.weight.data = 1 + 0.3 * torch.randn(48, generator=torch.Generator().manual_seed(5))
    x = (3 * torch.randn(4, 7, 48, generator=g)).bfloat16()
    assert torch.equal(ours(x), hf(x))


def test_the_exponential_race_draws_what_multinomial_draws():
    # sample_token samples by the race on every device; on the CPU torch.multinomial(p, 1) makes the very same
    # draw from the same generator, so the tokens are those multinomial gave (and the CPU results from before).
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(16, 300, generator=g)
    for T in (1.0, 0.5):
        p = torch.softmax(logits / T, -1)
        ours = [M.sample_token(logits, T, 0, 1.0, torch.Generator().manual_seed(s))[0] for s in range(5)]
        theirs = [torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s)).squeeze(-1) for s in range(5)]
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        assert len({tuple(t.tolist()) for t in ours}) == 5  # and they are draws, not the argmax


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    seen = {M.sample_token(logits, 1.0, 2, 1.0, gen)[0].item() for _ in range(200)}
    assert seen == {0, 1}
    p = torch.softmax(logits, -1)[0]
    seen = {M.sample_token(logits, 1.0, 0, float(p[0] + 0.01), gen)[0].item() for _ in range(200)}
    assert seen == {0, 1}  # the smallest prefix reaching top_p holds the two best tokens
    tok, lp, ent = M.sample_token(logits, 0.0, 0, 1.0)
    assert tok.item() == 0 and torch.isclose(lp, torch.log_softmax(logits, -1)[:, 0]).all()
    # With a filter, the log-prob and entropy are still those of the whole softmax(logits / T) (what PPO's
    # ratio and the confidence are defined on), not of the truncated, renormalised distribution.
    full = torch.log_softmax(logits / 0.7, -1)[0]
    for top_k, top_p in ((2, 1.0), (0, 0.8), (3, 0.9)):
        tok, lp, ent = M.sample_token(logits, 0.7, top_k, top_p, gen)
        assert lp.item() == pytest.approx(full[tok.item()].item(), abs=1e-6)
        assert ent.item() == pytest.approx(-(full.exp() * full).sum().item(), abs=1e-6)


def test_sharded_and_bf16_checkpoints_load_in_transformers(tmp_path):
    m = randomize(Transformer(tiny("llama", tied=False)), 2).eval()
    m.save_pretrained(tmp_path / "sh", max_shard_bytes=20_000)
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    back = Transformer.from_pretrained(tmp_path / "sh")
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sh", dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() <= 1e-5
    m.save_pretrained(tmp_path / "bf", dtype=torch.bfloat16)
    bf = Transformer.from_pretrained(tmp_path / "bf")
    assert bf.lm_head.weight.dtype == torch.bfloat16 and bf.inv_freq.dtype == torch.float32
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_check_out_dir_puts_back_a_checkpoint_caught_between_renames(tmp_path):
    """atomic_dir renames out -> out.old, then out.tmp -> out; a crash between the two leaves only out.old.
    check_out_dir (the first thing sft.py and ppo.py do with --out) puts it back, so --resume finds it and
    a new run without --resume or --overwrite is refused instead of writing over it."""
    Transformer(tiny("llama")).save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "train_state.pt").write_bytes(b"state")
    (tmp_path / "out").rename(tmp_path / "out.old")
    with pytest.raises(M.CheckpointError, match="already exists"):
        M.check_out_dir(tmp_path / "out", resume=False, overwrite=False)
    assert not (tmp_path / "out.old").exists() and (tmp_path / "out" / "train_state.pt").read_bytes() == b"state"
    M.check_out_dir(tmp_path / "out", resume=True, overwrite=False)


def _cli(ckpt):
    return subprocess.run([sys.executable, str(ROOT / "model.py"), str(ckpt), "--check"],
                          capture_output=True, text=True, cwd=ROOT)


def test_bad_checkpoints_one_line_exit_2(tmp_path):
    from safetensors.torch import load_file, save_file
    m = Transformer(tiny("llama", tied=False))
    good = tmp_path / "good"
    m.save_pretrained(good)
    assert _cli(good).returncode == 0

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        edit(d)
        r = _cli(d)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        return lines[0]

    def drop(d):
        st = load_file(str(d / "model.safetensors"))
        st.pop("model.layers.1.mlp.up_proj.weight")
        save_file(st, str(d / "model.safetensors"))

    def reshape(d):
        st = load_file(str(d / "model.safetensors"))
        st["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
        save_file(st, str(d / "model.safetensors"))

    def config_edit(**kv):
        def f(d):
            c = json.loads((d / "config.json").read_text())
            for k, v in kv.items():
                if v is None:
                    c.pop(k)
                else:
                    c[k] = v
            (d / "config.json").write_text(json.dumps(c))
        return f

    def truncate(d):
        b = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(b[: len(b) // 2])

    assert "model.layers.1.mlp.up_proj.weight" in variant("missing", drop)
    assert "k_proj" in variant("shape", reshape) and "(8, 64)" in variant("shape2", reshape)
    assert "unknown architecture" in variant("arch", config_edit(model_type="gpt2"))
    assert "hidden_size" in variant("field", config_edit(hidden_size=None))
    assert "model.safetensors" in variant("trunc", truncate)
    assert "config.json" in variant("nojson", lambda d: (d / "config.json").write_text("{oops"))


def test_rope_in_its_roll_form_is_hf_rotate_half_bit_for_bit():
    """apply_rope computes x * cos + roll(x) * [-sin1, sin2]; HF computes x * cos + [-x2, x1] * sin. The same
    products with the sign moved, so the same bits: fp32, bf16, and bf16 activations with fp32 tables (autocast)."""
    cfg = tiny(head_dim=16)
    inv_freq = M.rope_inv_freq(cfg)
    g = torch.Generator().manual_seed(7)
    pos = torch.randint(0, 4000, (2, 9), generator=g)
    for x_dtype, table_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.bfloat16, torch.float32)):
        x = (torch.randn(2, 9, 5, 16, generator=g) * 3).to(x_dtype)
        cos, sin_signed = M.rope_tables(pos, inv_freq, table_dtype)
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        sin = emb.sin().to(table_dtype)  # HF's tables
        assert torch.equal(cos, emb.cos().to(table_dtype))
        x1, x2 = x.chunk(2, dim=-1)
        hf = x * cos + torch.cat((-x2, x1), dim=-1) * sin
        assert torch.equal(M.apply_rope(x, cos, sin_signed), hf)
