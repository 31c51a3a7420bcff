"""ppo.py end to end on a toy task: the reward rises, the first ratio is 1, resume, bad inputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppo
import sft
from tokenizer import train_bpe

ROOT = Path(ppo.__file__).resolve().parent

# The toy task: "what is a plus b?". The SFT data answers right only half of the time (the other half
# says a+b+1), so the SFT policy is a coin flip between two answers and PPO has a clear signal to follow.
QS = [(3, 4), (12, 5), (7, 8), (21, 30), (9, 9), (14, 2), (6, 11), (40, 2)]


def question(a, b):
    return f"Tom has {a} red apples and {b} green apples. How many apples does he have?"


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    pairs, problems = [], []
    for i, (a, b) in enumerate(QS):
        problems.append({"id": f"toy-{i}", "question": question(a, b), "answer": str(a + b),
                         "intermediates": [str(a + b)]})
        for wrong in (0, 1):
            c = a + b + wrong
            pairs.append({"prompt": f"Question: {question(a, b)}\n", "completion": f"{a} + {b} = {c}.\nThe answer is {c}."})
    (d / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (d / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    train_bpe([p["prompt"] + p["completion"] for p in pairs], 300).save(d / "tok")
    sft.train(sft.SFTConfig(data=str(d / "train.jsonl"), init="scratch", tokenizer=str(d / "tok"), model="tiny",
                            out=str(d / "sft"), batch_size=8, max_steps=250, lr=5e-3, warmup_steps=5, eval_frac=0.0,
                            eval_every=0, save_every=0, log_every=50))
    return d


def toy_cfg(d, out, **kw):
    base = dict(init=str(d / "sft"), problems=str(d / "problems.jsonl"), eval_problems="", out=str(out),
                prompts_per_step=16, max_new_tokens=24, steps=16, ppo_epochs=2, minibatch_size=8, lr=3e-4,
                critic_lr=1e-2, kl_coef=0.01, sample_every=0, save_every=0, log_every=1, seed=0)
    base.update(kw)
    return ppo.PPOConfig(**base)


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reward,advantage", [("ccrl", "gae"), ("outcome", "grpo")])
def test_reward_rises_on_toy_task(sft_ckpt, tmp_path, reward, advantage):
    kw = dict(reward=reward, advantage=advantage)
    if advantage != "gae":
        kw.update(samples_per_prompt=4, prompts_per_step=4)
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "ppo", **kw))
    rows = metrics(tmp_path / "ppo")
    first = rows[0]["accuracy"]  # the first rollout is sampled before any update: the SFT policy
    # the second half's mean: one or two late dips of a 16-prompt toy batch are noise, not a regression
    last = sum(r["accuracy"] for r in rows[len(rows) // 2:]) / (len(rows) - len(rows) // 2)
    assert 0.25 < first < 0.75, rows[0]  # about a coin flip
    assert last > first + 0.2, [r["accuracy"] for r in rows]
    for r in rows:
        # Old log-probs come from the same forward as the update: the first minibatch's ratio is 1.
        assert abs(r["first_ratio"] - 1) < 1e-6 and abs(r["first_approx_kl"]) < 1e-7
        assert r["gen_logprob_gap"] < 1e-4  # the sampler's log-probs agree with the scoring forward
    if reward == "ccrl":
        assert any(r["computed_per_response"] > 0 for r in rows)
        assert "explained_variance" in rows[-1]
    assert rows[0]["kl"] == rows[0]["kl_k3"] == 0.0  # the first rollouts come from the reference itself
    for r in rows:  # the logged reward is the scores, the CCRL terms and the KL penalty, nothing else
        assert r["reward"] == pytest.approx(r["score"] + r["confidence_bonus"] - r["kl_coef"] * r["kl"], abs=1e-5)


def test_resume_is_exact(sft_ckpt, tmp_path):
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "a", steps=4))
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "b", steps=4, stop_at=2))
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "b", steps=4, resume=True))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "value_head.safetensors").read_bytes() == (tmp_path / "b" / "value_head.safetensors").read_bytes()
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4]


def run_cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "ppo.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_bad_inputs_one_line_exit_2(sft_ckpt, tmp_path):
    d = sft_ckpt
    base = ["--init", d / "sft", "--problems", d / "problems.jsonl", "--eval-problems", "", "--out", tmp_path / "o",
            "--steps", 1, "--prompts-per-step", 2, "--max-new-tokens", 4]

    def bad(expect, *extra):
        r = run_cli(base + list(extra), tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr

    bad("expected 0 <= alpha < beta", "--alpha", 0.3, "--beta", 0.2)
    bad("samples-per-prompt >= 2", "--advantage", "grpo")
    bad("expected a positive", "--temperature", 0)
    bad("expected gae, grpo or rloo", "--advantage", "ppo2")
    bad("--compile with --fsdp", "--compile", "--fsdp")
    no_answer = tmp_path / "noans.jsonl"
    no_answer.write_text(json.dumps({"id": "x", "question": "What?"}) + "\n")
    bad("noans.jsonl", "--problems", no_answer)
    # A critic is required (GAE) but the checkpoint to take it from has no value head.
    bad("value_head.safetensors", "--value-init", d / "sft")
    bad(f"--value-init {tmp_path / 'nowhere'}: not a checkpoint directory", "--value-init", tmp_path / "nowhere")
    bad("--dtype 'fp16'", "--dtype", "fp16")
    bad("--log-every 0: expected a positive integer", "--log-every", 0)
    bad("--eval-every -1: expected a number >= 0", "--eval-every", -1)
    (tmp_path / "notes.txt").write_text("mine")
    bad("--out", "--out", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()  # nothing was written by any of the refused runs


@pytest.mark.parametrize("kw", [dict(critic="separate", target_kl=1e-9),
                                dict(advantage="rloo", samples_per_prompt=2, prompts_per_step=4, kl_target=1.0),
                                dict(shuffle_scores=True)])
def test_variants_run_and_resume(sft_ckpt, tmp_path, kw):
    """The separate critic (saved under critic/, reloaded on resume), early stopping on target KL,
    RLOO with the adaptive KL controller, the shuffled-scores control: each runs, logs, and resumes exactly."""
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "a", steps=2, **kw))
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "b", steps=2, stop_at=1, **kw))
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "b", steps=2, resume=True, **kw))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    rows = metrics(tmp_path / "a")
    if kw.get("critic") == "separate":
        assert (tmp_path / "a" / "critic" / "model.safetensors").exists()
        assert all(r["minibatches"] == 2 for r in rows)  # target_kl stops after epoch 1 (2 minibatches of 8)
    elif kw.get("advantage") == "rloo":
        assert "value_loss" not in rows[0]
        # the controller's update from the logged KL per sequence, over the 8 rollouts of the update
        err = min(max(rows[0]["kl"] / 1.0 - 1.0, -0.2), 0.2)
        assert rows[1]["kl_coef"] == pytest.approx(rows[0]["kl_coef"] * (1 + err * 8 / 10000), rel=1e-12)
        assert rows[0]["kl"] == rows[0]["kl_k3"] == 0.0  # the first rollouts come from the reference itself
    else:  # the control trains on other rollouts' scores: not the real run's weights
        ppo.train(toy_cfg(sft_ckpt, tmp_path / "real", steps=2))
        assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "real" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("advantage,whiten", [("gae", False), ("gae", True), ("rloo", False)])
def test_ppo_step_wiring_equals_an_independent_recomputation(sft_ckpt, monkeypatch, advantage, whiten):
    """ppo_step's steps 3-5 against a recomputation from plain pieces: log-probs from one full forward and
    log_softmax at the rollout temperature, the value head on the hidden state before each response token,
    rewards and GAE as Python loops, whitening in numpy. Policy and reference differ and the value head is not
    zero, so the KL term, its sign and the values all carry numbers (at a real run's first update they are 0)."""
    import copy

    from confidence import ccrl_reward_from_rollout
    from data import grade_answer, load_problems
    from model import Transformer
    from tokenizer import Tokenizer

    d, T, coef, G = sft_ckpt, 0.7, 0.3, (2 if advantage == "rloo" else 1)
    cfg = toy_cfg(d, d / "unused", temperature=T, kl_coef=coef, advantage=advantage, samples_per_prompt=G,
                  prompts_per_step=6 // G, minibatch_size=4, ppo_epochs=1, seed=3, whiten_rewards=whiten)
    torch.manual_seed(0)
    policy, ref = Transformer.from_pretrained(d / "sft"), Transformer.from_pretrained(d / "sft").requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    critic = ppo.ValueModel(policy.config.hidden_size) if advantage == "gae" else None
    if critic is not None:
        with torch.no_grad():
            critic.head.weight.normal_(0, 0.5), critic.head.bias.fill_(0.3)
    params = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    tok = Tokenizer.load(d / "sft")
    ctx = dict(policy=policy, ref=ref, critic=critic, train_policy=policy, train_critic=critic, tok=tok,
               opt=torch.optim.AdamW(params, lr=1e-4), device="cpu", autocast=torch.autocast("cpu", enabled=False),
               problems=load_problems(d / "problems.jsonl"), kl=ppo.FixedKLController(coef), params=params, rank=0,
               world=1, fsdp=False)
    seen, real_rollout = {}, ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a, **k: seen.setdefault("r", real_rollout(*a, **k)))
    pol0, crit0 = copy.deepcopy(policy), copy.deepcopy(critic)  # the update changes them; the scoring saw these
    row = ppo.ppo_step(0, cfg, ctx)

    p_ids, p_mask, g = seen["r"]
    B, P, N = g.tokens.shape[0], p_ids.shape[1], g.tokens.shape[1]
    ids, attn = torch.cat([p_ids, g.tokens], 1), torch.cat([p_mask, g.mask], 1)
    with torch.no_grad():
        def logp_of(model):  # (B, N): column P+i-1 predicts response token i
            logits = model(ids, attention_mask=attn)[:, P - 1:P - 1 + N].double()
            return torch.log_softmax(logits / T, -1).gather(-1, g.tokens[..., None])[..., 0]
        old, ref_lp = logp_of(pol0), logp_of(ref)
        hidden = pol0(ids, attention_mask=attn, logits=False)
        values = crit0.head(hidden[:, P - 1:P - 1 + N]).squeeze(-1).double() if crit0 is not None else None
    batch = [ctx["problems"][i] for i in ppo.problem_indices(len(ctx["problems"]), cfg.prompts_per_step, cfg.seed, 0)
             for _ in range(G)]
    texts = [ppo.response_text(tok, g.tokens[b][g.mask[b].bool()].tolist()) for b in range(B)]
    scores, _, _ = ccrl_reward_from_rollout(
        g.tokens, g.mask, g.entropies, [p["question"] for p in batch],
        [[p["answer"], *p["intermediates"]] for p in batch], [grade_answer(t, p["answer"]) for t, p in zip(texts, batch)],
        g.finished.tolist(), tok.token_bytes, stop_ids=tok.stop_ids, alpha=cfg.alpha, beta=cfg.beta, penalty=cfg.penalty)
    lengths = g.mask.sum(1).tolist()
    rewards = [[float(scores[b, t]) - coef * float(old[b, t] - ref_lp[b, t]) for t in range(lengths[b])] for b in range(B)]
    assert row["kl"] == pytest.approx(sum(float(old[b, t] - ref_lp[b, t]) for b in range(B)
                                          for t in range(lengths[b])) / B, rel=1e-4, abs=1e-6)
    assert abs(row["kl"]) > 1e-3  # the perturbed policy is not the reference
    assert row["reward"] == pytest.approx(sum(map(sum, rewards)) / B, rel=1e-4, abs=1e-6)
    if whiten:  # scaled by their std over all tokens, the mean kept (LHP)
        flat = np.array([r for rs in rewards for r in rs])
        rewards = [[(r - flat.mean()) / math.sqrt(flat.var(ddof=1) + 1e-8) + flat.mean() for r in rs] for rs in rewards]
    expected = torch.zeros(B, N, dtype=torch.float64)
    if advantage == "gae":
        for b in range(B):
            a, v = 0.0, [float(values[b, t]) for t in range(lengths[b])] + [0.0]  # no value after the last token
            for t in reversed(range(lengths[b])):
                a = rewards[b][t] + cfg.gamma * v[t + 1] - v[t] + cfg.gamma * cfg.lam * a
                expected[b, t] = a
        flat = np.array([float(expected[b, t]) for b in range(B) for t in range(lengths[b])])
        for b in range(B):
            expected[b, :lengths[b]] = (expected[b, :lengths[b]] - flat.mean()) / math.sqrt(flat.var(ddof=1) + 1e-8)
    else:
        totals = [sum(r) for r in rewards]
        for b in range(B):
            others = [totals[j] for j in range(b - b % G, b - b % G + G) if j != b]
            expected[b, :lengths[b]] = totals[b] - sum(others) / len(others)
    assert torch.allclose(ctx["advantages"].double(), expected, atol=2e-4), (ctx["advantages"] - expected).abs().max()


def test_problem_indices_walk_through_each_epoch_once():
    seq = [i for step in range(5) for i in ppo.problem_indices(10, 4, seed=3, step=step)]  # step 2 crosses epochs
    assert sorted(seq[:10]) == sorted(seq[10:20]) == list(range(10)) and seq[:10] != seq[10:20]
    assert ppo.problem_indices(10, 4, seed=3, step=2) == seq[8:12]  # a pure function of (seed, step): --resume
    assert ppo.problem_indices(10, 4, seed=4, step=0) != seq[:4]


def test_value_init_loads_the_value_head(sft_ckpt, tmp_path):
    from safetensors.torch import load_file
    ppo.train(toy_cfg(sft_ckpt, tmp_path / "a", steps=1))
    saved = load_file(str(tmp_path / "a" / "value_head.safetensors"))
    assert saved["weight"].abs().sum() > 0  # trained away from its zero init
    critic = ppo.setup(toy_cfg(sft_ckpt, tmp_path / "b", value_init=str(tmp_path / "a")))[3]
    assert torch.equal(critic.head.weight, saved["weight"]) and torch.equal(critic.head.bias, saved["bias"])
    assert ppo.setup(toy_cfg(sft_ckpt, tmp_path / "c"))[3].head.weight.abs().sum() == 0  # without: a fresh head
