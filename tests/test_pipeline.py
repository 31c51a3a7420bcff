"""The whole pipeline in miniature, through the command lines a user types: data -> tokenizer -> base
stage -> CoMT-SFT -> CCRL -> evaluation. Each stage must write what the next one reads."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_pipeline_in_miniature(tmp_path):
    py = lambda name: ROOT / name
    run(py("data.py"), "build", "--out", "data", "--n-train", 64, "--n-test", 8, "--n-ood", 8, "--n-pretrain", 300,
        "--n-pretrain-test", 8, cwd=tmp_path)
    for f in ["world/train.jsonl", "world/test_id.jsonl", "world/ood_hard.jsonl", "pretrain.jsonl", "cot.jsonl",
              "comt.jsonl"]:
        assert (tmp_path / "data" / f).stat().st_size > 0, f
    run(py("tokenizer.py"), "train", "--data", "data/pretrain.jsonl", "--vocab-size", 300, "--out", "data/tokenizer",
        cwd=tmp_path)
    common = ["--batch-size", 8, "--eval-every", 0, "--log-every", 1, "--max-len", 256]
    run(py("sft.py"), "--data", "data/pretrain.jsonl", "--init", "scratch", "--tokenizer", "data/tokenizer",
        "--model", "tiny", "--out", "base", "--max-steps", 4, *common, cwd=tmp_path)
    run(py("sft.py"), "--data", "data/comt.jsonl", "--init", "base", "--out", "ckpt/comt", "--max-steps", 3,
        "--replay", "data/pretrain.jsonl", "--replay-frac", 0.5,
        "--eval-problems", "data/world/test_id.jsonl", "--eval-problems-n", 4, *common, cwd=tmp_path)
    comt_log = [json.loads(l) for l in (tmp_path / "ckpt/comt/metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in comt_log[-1]
    run(py("ppo.py"), "--init", "ckpt/comt", "--problems", "data/world/train.jsonl", "--eval-problems",
        "data/world/test_id.jsonl", "--eval-problems-n", 4, "--out", "ckpt/comt_ccrl", "--steps", 2,
        "--prompts-per-step", 4, "--minibatch-size", 4, "--max-new-tokens", 16, "--reward", "ccrl", cwd=tmp_path)
    for f in ["config.json", "model.safetensors", "value_head.safetensors", "train_state.pt", "ppo_config.json",
              "metrics.jsonl", "tiktoken_config.json"]:
        assert (tmp_path / "ckpt/comt_ccrl" / f).exists(), f
    run(py("eval.py"), "--ckpt", "base", "ckpt/comt", "ckpt/comt_ccrl", "--sets", "data/world/test_id.jsonl",
        "data/world/ood_hard.jsonl", "--limit", 4, "--max-new-tokens", 16, "--arithmetic", 1, "--out", "out",
        cwd=tmp_path)
    table = (tmp_path / "out/table.md").read_text()
    assert all(name in table for name in ("base", "comt", "comt_ccrl")) and "Arithmetic" in table
    m = json.loads((tmp_path / "out/comt_ccrl/metrics.json").read_text())
    assert m["id_sets"] == ["test_id"] and m["ood_sets"] == ["ood_hard"]
    # RL time is counted on top of the SFT it started from.
    assert sorted(Path(p).name for p, _ in m["train_stages"]) == ["comt", "comt_ccrl"]
    html = (tmp_path / "out/report.html").read_text()
    assert "<svg" in html and "comt_ccrl" in html
