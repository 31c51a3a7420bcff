"""sft.py and ppo.py under torchrun with 2 gloo processes (DDP and FSDP2) against 1 process: the same
losses, weights, whitened advantages and logged scalars, and checkpoints that resume under 1 process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ppo
import sft
from model import CONFIGS, ModelConfig, Transformer
from tokenizer import train_bpe

ROOT = Path(sft.__file__).resolve().parent
QS = [(3, 4), (12, 5), (7, 8), (21, 30), (9, 9), (14, 2), (6, 11)]


def torchrun(script, *args, cwd, env=None, n=2):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def python(script, *args, cwd, env=None):
    r = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def flags(**kw):
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def metrics(d):
    return [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    """Equal up to float summation order. Adam divides each gradient by its running RMS, so an element
    whose gradient is a near-cancellation of per-example terms (known only to ~1e-7 of those terms) can
    move differently by a few 1e-5 after a few steps; a real bug (a lost gradient scale, a rank's rows
    dropped) moves most elements by ~lr. So: all within 1e-4, and 99.9% within 1e-6."""
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diff.max() <= 1e-4 and (diff > 1e-6).float().mean() <= 1e-3, (b, diff.max(), (diff > 1e-6).sum())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Seven prompt/completion pairs, their problems, a tokenizer and a random tiny model (PPO's init)."""
    d = tmp_path_factory.mktemp("dist")
    q = lambda a, b: f"Tom has {a} red apples and {b} green apples. How many apples does he have?"
    pairs = [{"prompt": f"Question: {q(a, b)}\n", "completion": f"{a} + {b} = {a + b}.\nThe answer is {a + b}."}
             for a, b in QS]
    problems = [{"id": f"p{i}", "question": q(a, b), "answer": str(a + b), "intermediates": [str(a + b)]}
                for i, (a, b) in enumerate(QS * 2)]
    (d / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (d / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    tok = train_bpe([p["prompt"] + p["completion"] for p in pairs] * 4 + ["so x = 1.\nThe answer is 2."], 300)
    tok.save(d / "tok")
    torch.manual_seed(0)
    # untied head (the SFT test's scratch model is tied): the head is used outside the wrapped forward
    mc = dict(CONFIGS["tiny"], vocab_size=320, tie_word_embeddings=False, bos_token_id=tok.bos_id,
              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    Transformer(ModelConfig(**mc)).save_pretrained(d / "init", extra=tok.save)
    return d


def test_sft_two_processes_equal_one_and_resume_under_one(world, tmp_path):
    # 5 training examples in batches of 2: the last batch of each epoch has 1 row, so one rank gets none;
    # grad_accum 2 exercises the unsynchronised micro-step; 2 examples held out for the eval loss.
    common = flags(data=world / "train.jsonl", init="scratch", tokenizer=world / "tok", model="tiny", batch_size=2,
                   grad_accum=2, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=3, save_every=0, log_every=1,
                   eval_frac=0.3, overwrite=True)
    sft.main(common + ["--out", str(tmp_path / "one")])
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        torchrun(ROOT / "sft.py", *common, "--out", out, "--stop-at", 3, *(["--fsdp"] if mode == "fsdp" else []),
                 cwd=tmp_path)
        # ... and the checkpoint the 2 ranks wrote continues under 1 process.
        sft.main(common[:-1] + ["--out", str(out), "--resume"])
        one, two = metrics(tmp_path / "one"), metrics(out)
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(one, two):
            for key in ("loss", "grad_norm", "eval_loss"):
                if a.get(key) is not None:
                    assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (mode, a, b)
        assert_same_weights(tmp_path / "one", out)


PPO_SCALARS = ["score", "accuracy", "confidence_bonus", "computed_per_response", "computed_correct_frac", "reward",
               "kl", "kl_k3", "kl_coef", "entropy", "gen_logprob_gap", "approx_kl", "clipfrac", "ratio", "ratio_var",
               "first_ratio", "first_approx_kl", "policy_loss", "grad_norm", "response_len", "eos_frac",
               "value_loss", "value_clipfrac", "explained_variance", "minibatches"]


def test_ppo_two_processes_equal_one_fed_the_same_rollouts(world, tmp_path):
    # 2 ranks x 4 prompts == 1 process x 8 prompts; one minibatch per epoch, 2 epochs, adaptive KL.
    def run(n, out, per_rank, *extra):
        adv = tmp_path / f"adv_{out}"
        adv.mkdir()
        args = flags(init=world / "init", problems=world / "problems.jsonl", eval_problems="", out=tmp_path / out,
                     steps=2, prompts_per_step=per_rank, minibatch_size=per_rank, ppo_epochs=2, lr=1e-3,
                     critic_lr=1e-2, kl_target=0.5, reward="ccrl", sample_every=0, save_every=0) + list(extra)
        env = {**__import__("os").environ, "ADV_DIR": str(adv)}
        script = ROOT / "tests" / "ppo_fixed_rollouts.py"
        torchrun(script, *args, cwd=tmp_path, env=env) if n > 1 else python(script, *args, cwd=tmp_path, env=env)
        return adv

    adv1 = run(1, "one", 8)
    for mode in ("ddp", "fsdp"):
        adv2 = run(2, mode, 4, *(["--fsdp"] if mode == "fsdp" else []))
        one, two = metrics(tmp_path / "one"), metrics(tmp_path / mode)
        assert len(one) == len(two) == 2
        for a, b in zip(one, two):
            for key in PPO_SCALARS:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (mode, key, a[key], b[key])
        for step in range(2):
            full = torch.load(adv1 / f"adv_{step}_0.pt")  # (8, N)
            for rank in range(2):
                part = torch.load(adv2 / f"adv_{step}_{rank}.pt")  # (4, N_rank)
                mine = full[4 * rank:4 * rank + 4]
                assert mine[:, part.shape[1]:].abs().sum() == 0  # nothing beyond this rank's longest response
                torch.testing.assert_close(part, mine[:, :part.shape[1]], atol=1e-5, rtol=1e-5)
        assert_same_weights(tmp_path / "one", tmp_path / mode)


def test_ppo_fsdp_rollouts_and_resume_under_one_process(world, tmp_path):
    """Real sampling under FSDP (every rank decodes until all ranks are done), a separate critic sharded
    too, bf16 (FSDP's mixed-precision policy + autocast, as on a GPU), then the gathered checkpoint
    continues under 1 process."""
    args = flags(init=world / "init", problems=world / "problems.jsonl", eval_problems="", out=tmp_path / "o",
                 steps=2, prompts_per_step=3, minibatch_size=3, max_new_tokens=12, critic="separate",
                 dtype="bfloat16", sample_every=0, save_every=0)
    torchrun(ROOT / "ppo.py", *args, "--stop-at", 1, "--fsdp", cwd=tmp_path)
    for f in ["config.json", "model.safetensors", "value_head.safetensors", "critic/model.safetensors", "train_state.pt"]:
        assert (tmp_path / "o" / f).exists(), f
    ppo.main(args + ["--resume"])
    rows = metrics(tmp_path / "o")
    assert [r["step"] for r in rows] == [1, 2] and all(r["response_len"] > 0 for r in rows)
    assert abs(rows[0]["first_ratio"] - 1) < 1e-6
