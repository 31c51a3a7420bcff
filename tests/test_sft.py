"""sft.py: loss mask, overfitting, exact resume, crash safety, transformers parity, bad inputs."""

import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sft
from model import Transformer
from tokenizer import Tokenizer, train_bpe

ROOT = Path(sft.__file__).resolve().parent

PAIRS = [
    {"prompt": f"Question: what is {a} plus {b}?\n", "completion": f"{a} + {b} = {a + b}\nThe answer is {a + b}."}
    for a, b in [(3, 4), (12, 5), (7, 8), (21, 30), (9, 9), (14, 2), (6, 11), (40, 2)]
]


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [p["prompt"] + p["completion"] for p in PAIRS] * 4 + ["Tom has some apples and shares them."]
    train_bpe(texts, 300).save(d)
    return d


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sft.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def base_args(tmp_path, tokdir, out="out", **kw):
    args = dict(data=write_jsonl(tmp_path / "train.jsonl", PAIRS), init="scratch", tokenizer=tokdir, model="tiny",
                out=tmp_path / out, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0,
                log_every=5, eval_frac=0.0)
    args.update(kw)
    return args


def cfg_of(**kw):
    return sft.SFTConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})


def test_loss_mask_is_exactly_the_completion(tokdir):
    tok = Tokenizer.load(tokdir)
    p = PAIRS[0]
    ids, mask = sft.encode_example(tok, p, "x")
    n_prompt = 1 + len(tok.encode(p["prompt"]))  # BOS + prompt
    comp = tok.encode(p["completion"])
    assert ids == [tok.bos_id] + tok.encode(p["prompt"]) + comp + [tok.eos_id]
    assert mask == [0] * n_prompt + [1] * (len(comp) + 1)
    # collate: targets are the next tokens, and exactly the completion (+EOS) carries loss.
    x, y = sft.collate([(ids, mask), (ids[:5], [0] * 5)], [0, 1], tok.pad_id, "cpu")
    assert y[0][y[0] != -100].tolist() == comp + [tok.eos_id]
    assert (y[1] == -100).all()
    # eos: false (a CoMT prefix the student continues): no EOS trained.
    ids2, mask2 = sft.encode_example(tok, {**p, "eos": False}, "x")
    assert ids2[-1] != tok.eos_id and sum(mask2) == len(comp)


def test_replay_mixes_a_fixed_share_of_whole_documents(tmp_path, tokdir):
    docs = [{"text": f"Tom has {i} apples and shares them."} for i in range(40)]
    args = base_args(tmp_path, tokdir, replay=write_jsonl(tmp_path / "rep.jsonl", docs), replay_frac=0.2)
    model, tok, train, held, _, n_rep, _ = sft.setup(cfg_of(**args))
    assert n_rep == 2 and len(train) == len(PAIRS) + 2  # 2 / 10 = 0.2 of the mixed set
    texts = {tok.decode(ids[1:-1]): mask for ids, mask in train[len(PAIRS):]}
    assert set(texts) <= {d["text"] for d in docs}
    assert all(m == [0] + [1] * (len(m) - 1) for m in texts.values())  # loss on the whole document
    # the subset is a function of the seed: the same again (resume), another for another seed
    assert [ids for ids, _ in sft.setup(cfg_of(**args))[2]] == [ids for ids, _ in train]
    other = [sft.setup(cfg_of(**{**args, "seed": s}))[2][len(PAIRS):] for s in range(1, 6)]
    assert any(o != train[len(PAIRS):] for o in other)
    args["replay_frac"] = 0.5
    assert sft.setup(cfg_of(**args))[5] == len(PAIRS)


def test_tiny_model_overfits(tmp_path, tokdir):
    cfg = cfg_of(**base_args(tmp_path, tokdir, max_steps=300, lr=5e-3))
    sft.train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.05, rows[-1]
    assert rows[0]["loss"] > 1.0


def test_resume_is_bit_identical(tmp_path, tokdir):
    args = base_args(tmp_path, tokdir, max_steps=8, grad_accum=2, batch_size=2)
    assert run_cli(sum(([f"--{k.replace('_', '-')}", v] for k, v in args.items()), []), tmp_path).returncode == 0
    a = (tmp_path / "out" / "model.safetensors").read_bytes()
    args2 = {**args, "out": tmp_path / "out2"}
    flat = sum(([f"--{k.replace('_', '-')}", v] for k, v in args2.items()), [])
    r = run_cli(flat + ["--stop-at", 3], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out2" / "sft_config.json").read_text())["stop_at"] == 3
    r = run_cli(flat + ["--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == a
    steps = [json.loads(l)["step"] for l in (tmp_path / "out2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated log lines across the resume


def test_checkpoint_loads_in_transformers(tmp_path, tokdir):
    import transformers
    sft.train(cfg_of(**base_args(tmp_path, tokdir, max_steps=3)))
    ours = Transformer.from_pretrained(tmp_path / "out").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5
    assert Tokenizer.load(tmp_path / "out").encode("The answer is 7.") == Tokenizer.load(tokdir).encode("The answer is 7.")


@pytest.mark.parametrize("where", ["inside_write", "between_renames"])
def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, tokdir, where):
    """A process killed while writing a checkpoint leaves the previous one loadable."""
    sft.train(cfg_of(**base_args(tmp_path, tokdir, max_steps=2)))
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import model, sft
        where = {where!r}
        if where == "inside_write":
            real = sft.save_checkpoint
            def dying_extra(*a, **k):
                os.kill(os.getpid(), signal.SIGKILL)
            orig = model.Transformer.save_pretrained
            def save(self, path, dtype=None, max_shard_bytes=4 << 30, extra=None, state_dict=None):
                return orig(self, path, dtype, max_shard_bytes, extra=lambda tmp: (extra(tmp), dying_extra()),
                            state_dict=state_dict)
            model.Transformer.save_pretrained = save
        else:
            real_replace = os.replace
            calls = []
            def replace(a, b):
                real_replace(a, b)
                calls.append(a)
                if str(b).endswith(".old"):
                    os.kill(os.getpid(), signal.SIGKILL)
            model.os.replace = replace
        sft.main(sys.argv[1:])
    """)
    args = base_args(tmp_path, tokdir, max_steps=4, lr=0.05)
    args["overwrite"] = None
    flat = []
    for k, v in args.items():
        flat += [f"--{k.replace('_', '-')}"] + ([] if v is None else [str(v)])
    r = subprocess.run([sys.executable, "-c", script, *flat], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == -9, r.stderr
    m = Transformer.from_pretrained(tmp_path / "out")  # puts a checkpoint caught between renames back
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert m.config.vocab_size > 0 and (tmp_path / "out" / "train_state.pt").exists()


def test_bad_inputs_one_line_exit_2(tmp_path, tokdir):
    good = base_args(tmp_path, tokdir, max_steps=2)
    assert run_cli(sum(([f"--{k.replace('_', '-')}", v] for k, v in good.items()), []), tmp_path).returncode == 0
    ckpt = (tmp_path / "out" / "model.safetensors").read_bytes()

    def bad(expect, **override):
        args = {**good, **override}
        r = run_cli(sum(([f"--{k.replace('_', '-')}", v] for k, v in args.items()), []) + ["--overwrite"], tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == ckpt  # nothing overwritten

    bad("not found", data=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    bad("bad.jsonl:2", data=tmp_path / "bad.jsonl")
    bad("empty.jsonl:1", data=write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "Q\n", "completion": " "}]))
    bad("unk.jsonl:1", data=write_jsonl(tmp_path / "unk.jsonl", [{"prompt": "Q\n", "answer_text": "x"}]))
    bad("no config.json", init=tmp_path / "nowhere")
    bad("--replay-frac 1.0", replay=write_jsonl(tmp_path / "rep.jsonl", [{"text": "Tom has 3 apples."}]), replay_frac=1.0)
    bad("badrep.jsonl:1", replay=write_jsonl(tmp_path / "badrep.jsonl", [{"txt": "Tom"}]))
    # An --init whose embedding is smaller than the tokenizer.
    small = Transformer(sft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))
    small.save_pretrained(tmp_path / "small")
    Tokenizer.load(tokdir).save(tmp_path / "small")
    bad("embedding rows", init=tmp_path / "small")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    bad("latin1.jsonl:1: not UTF-8", data=tmp_path / "latin1.jsonl")
    bad("--batch-size 0: expected a positive integer", batch_size=0)  # (was a ZeroDivisionError traceback)
    if not torch.cuda.is_available():
        bad("--device cuda: no CUDA device here", device="cuda")
    # The other ranges, in-process (check_config runs first in setup, before anything is read or written).
    for flag, value, expect in (("grad_accum", "0", "a positive integer"), ("lr", "-1", "a positive number"),
                                ("max_steps", "-5", ">= 0"), ("log_every", "0", "a positive integer"),
                                ("dtype", "fp16", "auto, float32 or bfloat16"), ("eval_frac", "1", "in [0, 1)"),
                                ("min_lr_frac", "1.5", "in [0, 1]")):
        with pytest.raises(sft.DataError, match=re.escape(f"--{flag.replace('_', '-')} ") + ".*" + re.escape(expect)):
            sft.check_config(sft.parse_args([f"--{flag.replace('_', '-')}", value]))
    sft.check_config(sft.parse_args([]))  # the defaults pass
    with pytest.raises(ValueError, match="--device gpu: expected auto, cpu or cuda"):
        sft.resolve_device("gpu")

    # Without --overwrite or --resume: an existing checkpoint, a file, a directory of other things are refused.
    def refused(expect, out):
        r = run_cli(sum(([f"--{k.replace('_', '-')}", v] for k, v in {**good, "out": out}.items()), []), tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
    refused("a checkpoint already exists", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("mine")
    refused("exists and is not a directory", tmp_path / "notes.txt")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "model-notes.txt").write_text("mine")  # a checkpoint write would drop model-* files
    refused("holds other files (model-notes.txt)", tmp_path / "mixed")
    assert (tmp_path / "notes.txt").read_text() == (tmp_path / "mixed" / "model-notes.txt").read_text() == "mine"
    # A run's own leftovers (killed before its first checkpoint) are no obstacle.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "metrics.jsonl").write_text('{"step": 1}\n')
    r = run_cli(sum(([f"--{k.replace('_', '-')}", v] for k, v in {**good, "out": tmp_path / "killed"}.items()), []),
                tmp_path)
    assert r.returncode == 0 and (tmp_path / "killed" / "config.json").exists(), r.stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tokdir, monkeypatch):
    sft.train(cfg_of(**base_args(tmp_path, tokdir, max_steps=2)))
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    real = sft.chunked_cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        nll, n = real(*a, **k)
        return (nll * float("nan") if calls["n"] >= 3 else nll), n

    monkeypatch.setattr(sft, "chunked_cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        sft.train(cfg_of(**base_args(tmp_path, tokdir, max_steps=6, save_every=1, overwrite=True)))
    # Two good steps were saved; the NaN step wrote nothing. (Within the warmup the schedule does not
    # depend on max_steps, so the saved weights equal those of the clean two-step run.)
    m = Transformer.from_pretrained(tmp_path / "out")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    st = torch.load(tmp_path / "out" / "train_state.pt", weights_only=True)
    assert st["step"] == 2 and (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_lr_schedule_pinned_points():
    """Linear warmup to the peak, then a cosine from the peak down to lr * min_lr_frac at the last step."""
    cfg = sft.SFTConfig(lr=1e-3, warmup_steps=4, min_lr_frac=0.1)
    lrs = [sft.lr_at(s, cfg, 24) for s in range(25)]
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lrs[14] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way through the cosine
    assert lrs[24] == pytest.approx(1e-4) and sft.lr_at(40, cfg, 24) == pytest.approx(1e-4)  # the floor, then flat
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_epoch_batches_cover_every_example_once_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1000)]
    a = sft.epoch_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000)) and all(1 <= len(b) <= 8 for b in a)
    assert a == sft.epoch_batches(lengths, 8, seed=1, epoch=0)  # what --resume recomputes
    assert a != sft.epoch_batches(lengths, 8, seed=1, epoch=1) and a != sft.epoch_batches(lengths, 8, seed=2, epoch=0)
    padding = lambda batches: sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)
    order = list(range(1000))
    rng.shuffle(order)
    assert padding(a) < 0.1 * padding([order[k:k + 8] for k in range(0, 1000, 8)])  # length-bucketed


def test_grad_accum_equals_one_larger_batch(tmp_path, tokdir, monkeypatch):
    """Two micro-batches of 2 examples and one batch of 4 are the same optimizer step: the loss is the mean
    over the step's loss tokens, not a mean of per-micro-batch means (the examples differ in length)."""
    fixed = {2: [[0, 1], [2, 3], [4, 5], [6, 7]], 4: [[0, 1, 2, 3], [4, 5, 6, 7]]}
    monkeypatch.setattr(sft, "epoch_batches", lambda lengths, bs, seed, epoch: fixed[bs])
    pairs = [dict(p, completion=p["completion"] + " So" * i) for i, p in enumerate(PAIRS)]  # unequal lengths
    data = write_jsonl(tmp_path / "uneven.jsonl", pairs)
    for name, bs, accum in (("a", 2, 2), ("b", 4, 1), ("c", 2, 1)):
        sft.train(cfg_of(**base_args(tmp_path, tokdir, out=name, data=data, batch_size=bs, grad_accum=accum,
                                     max_steps=2, log_every=1)))
    wa, wb, wc = (Transformer.from_pretrained(tmp_path / n).state_dict() for n in "abc")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert not all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)  # (steps on other data do differ)
    la, lb = ([json.loads(l)["loss"] for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in "ab")
    assert la == pytest.approx(lb, rel=1e-5)


def test_eval_loss_equals_cross_entropy_on_completion_tokens(tokdir):
    tok = Tokenizer.load(tokdir)
    torch.manual_seed(0)
    model = Transformer(sft.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    examples = [sft.encode_example(tok, p, "x") for p in PAIRS[:5]]
    cfg = sft.SFTConfig(batch_size=2)
    got = sft.eval_loss(model, examples, cfg, tok.pad_id, "cpu", torch.autocast("cpu", enabled=False))
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in examples:
            logits = model(torch.tensor([ids]))[0, :-1]  # position t predicts token t + 1
            keep = torch.tensor(mask[1:]).bool()
            total += float(torch.nn.functional.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum"))
            n += int(keep.sum())
    assert got == pytest.approx(total / n, rel=1e-5)
    assert n == sum(len(tok.encode(p["completion"])) + 1 for p in PAIRS[:5])  # the completion and its EOS


def test_messages_lines_and_examples_without_loss_tokens(tmp_path, tokdir):
    tok = Tokenizer.load(tokdir)
    msgs = [{"role": "user", "content": "what is 3 plus 4?"}, {"role": "assistant", "content": "7"}]
    ids, mask = sft.encode_example(tok, {"messages": msgs}, "x")
    assert (ids, mask) == tuple(tok.render_messages(msgs))
    assert 0 < sum(mask) < len(ids) and tok.decode([i for i, m in zip(ids, mask) if m]).startswith("7")
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Tom has " * 50, "completion": "7"}])
    with pytest.raises(sft.DataError, match=re.escape(f"{long}:1: no loss tokens within max_len=16")):
        sft.load_examples(str(long), tok, 16)
