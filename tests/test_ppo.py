"""ppo.py end to end on a toy task: the reward rises, the first ratio is 1, resume, bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

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
        assert "value_loss" not in rows[0] and rows[1]["kl_coef"] != rows[0]["kl_coef"]
    else:  # the control trains on other rollouts' scores: not the real run's weights
        ppo.train(toy_cfg(sft_ckpt, tmp_path / "real", steps=2))
        assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "real" / "model.safetensors").read_bytes()
