"""Tests for data.py: numbers and answers, the validator, teachers, problems files, the CLI; and benchmarks.py."""
import argparse
import dataclasses
import http.server
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_world import read, world  # noqa: F401 (world: the small embedded world, a fixture)

import benchmarks
import confidence
import data
import world as world_py

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- numbers and answers

@pytest.mark.parametrize("s,v", [("12", 12), ("1,234", 1234), ("-5", -5), ("3.5", 3.5), (".5", 0.5), ("3/4", 0.75),
                                 ("1 1/2", 1.5), ("$5", 5), ("50%", 50), ("72.", 72), ("-1,000.25", -1000.25)])
def test_parse_number(s, v):
    assert data.parse_number(s) == pytest.approx(v)


@pytest.mark.parametrize("s", ["abc", "", "5 apples", "1/0", "x2", "3:30"])
def test_parse_number_rejects(s):
    assert data.parse_number(s) is None


def test_numbers_and_answers():
    text = "Step 2: x2 = 10-3 and -4 or 1,200.5 with 3/4 of per_bag7"     # a label, names, a subtraction, a fraction
    assert data.find_computed_numbers(text, "") == ["10", "3", "-4", "1,200.5", "3/4"]
    assert data.normalize_answer("9 (apples)") == "9" and data.normalize_answer("$1,200.50") == "1200.5"
    assert data.normalize_answer("3/4") == "0.75" and data.normalize_answer("-9867630.0") == "-9867630"
    assert data.normalize_answer("3:30 p.m.") is None and data.normalize_answer("Yes") is None
    assert data.extract_answer("a\nThe answer is 1,234.\n") == "1,234"
    assert data.extract_answer("The answer is 3.5.") == "3.5" and data.extract_answer("no answer") is None
    assert data.extract_answer("The answer is 2.\nThe answer is 7.") == "7"
    assert data.answers_match("1,234", "1234") and data.answers_match("72.0", "72")
    assert not data.answers_match("73", "72") and not data.answers_match(None, "72") and not data.answers_match("x", "1")
    # grade_answer: True / False for a numeric final answer, None (PPO's penalty) without one, including a CoMT
    # response that stops after its plan, whose last answer line names a variable
    plan = "Plan:\nLet hay be the hay.\nThe answer is hay.\nExecution:\n"
    assert data.grade_answer(plan + "hay = 6\nThe answer is 6.", "6") is True
    assert data.grade_answer(plan + "hay = 5\nThe answer is 5.", "6") is False
    assert data.grade_answer(plan, "6") is None and data.grade_answer("no answer line", "6") is None
    assert data.grade_answer("The answer is about 6 apples.", "6") is None
    assert data.grade_answer("The answer is $6 (dollars).", "6") is True


def test_safe_eval_only_arithmetic():
    steps = []
    assert data.safe_eval("(48 - 6) / 2 * 3", steps=steps) == 63 and steps == [42, 21, 63]
    for bad in ["__import__('os')", "a + 1", "[1][0]", "2 ** 100", "1 / 0", "open('x')"]:
        with pytest.raises((ValueError, SyntaxError)):
            data.safe_eval(bad)


def test_validator():
    q = "Tom has 5 bags with 3 apples in each and eats half of 1,200 grapes. 3/4 of them are red."
    ok = "Plan:\nLet bags be the bags.\nStep 2: apples = bags * per_bag.\n1. Multiply.\nx2 = 5 * 3 with 1,200 and 3/4 and 2."
    assert data.find_computed_numbers(ok, q) == []
    assert data.find_computed_numbers("apples = 5 * 3 = 15, then 7.5 and -4 and 4/3 and 4/2 and 21. and Step 25", q) == \
        ["15", "7.5", "-4", "4/3", "21", "25"]                                  # 4/2 is 2: "half" states it
    with pytest.raises(data.Rejected, match="computed number 15"):
        data.check_meta_thought("Plan:\napples = 5 * 3 = 15.\nExecution:\n", q)
    with pytest.raises(data.Rejected, match="empty"):
        data.check_meta_thought("Plan:\n\nExecution:\n", q)
    assert sorted(data.question_values("twenty-five cats, a dozen eggs, 10% off")) == [0.1, 5, 10, 12, 20, 25, 100]
    assert sorted(data.question_values("3/4 of 12 eggs")) == [0.75, 3, 4, 12]      # a fraction states its value too


def test_validator_reads_numbers_as_confidence_does():
    q = "Sam has 24 cards and 6 friends. He came 3rd and won 5 games."
    # a bare a/b is one number (24/6 is 4, computed); in "a/b=c" or "a/b/c" the slash divides its parts
    assert data.find_computed_numbers("each = 24/6 and 24/6=4 and 24/6/3.", q) == ["24/6", "4"]
    assert data.find_computed_numbers("In the 4th step, left = 24 -6 - 5.", q) == []   # ordinal; "24 -6" subtracts
    assert data.find_computed_numbers("Step 20 then Step 21\n2) x\n21) y", q) == ["21", "21"]  # labels stop at 20
    with pytest.raises(data.Rejected, match=r"computed number 24/6 in the meta-thought \(and 1 more\)"):
        data.check_meta_thought("Plan:\neach = 24/6 = 4.\nExecution:\n", q)


def test_validator_rejects_every_number_ccrl_scores():
    """Whatever confidence.py calls a computed number (fractions read alike), the validator rejects; it adds
    only counters above 20. Random texts from number-like pieces, seeded."""
    rng = random.Random(0)
    pieces = ["Step ", "step #", "\n", "\n2. ", "1) ", " ", " = ", " / ", "/", "-", " -", "x", "_", ".", ",", "rd ",
              "th", "(", ")", "%", " half", " dozen ", "=", "*"]
    extra_seen = 0
    for _ in range(1500):
        text = "".join(rng.choice(pieces) if rng.random() < 0.55 else str(rng.choice(
            [rng.randint(0, 30), rng.randint(0, 3000), round(rng.random() * 10, rng.randint(1, 3))]))
            for _ in range(rng.randint(1, 12)))
        q = "A question with " + " and ".join(str(rng.randint(0, 30)) for _ in range(3)) + " and half."
        ours = data.find_computed_numbers(text, q)
        theirs = [n.text for n in confidence.computed_numbers(q, confidence.number_token_spans([text], fractions=True),
                                                               dedupe=False)]
        for t in theirs:
            assert t in ours, (text, q, ours, theirs)
            ours.remove(t)
        assert all(re.fullmatch(r"\d+", t) and int(t) > 20 for t in ours), (text, ours)
        extra_seen += len(ours)
    assert extra_seen > 0                                                         # the case did occur


# ----------------------------------------------------------------------------- the rule teacher

NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                       "How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}


def test_rule_teacher_constructed(tmp_path):
    p = data.problem_from(NATALIA, "x:1", "natalia")
    assert p["answer"] == "72" and p["intermediates"] == ["24", "72"] and p["source"] == "gsm8k"
    assert data.rule_teacher(p) == (
        'Plan:\nLet friends_april be the number in "48 of her friends in April".\n'
        "Find clips in May: clips_may = friends_april / two.\n"
        "Find clips altogether in April and May: clips_altogether = friends_april + clips_may.\n"
        "The answer is clips_altogether.\nExecution:\n")
    assert data.rule_teacher(p, "cot") == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                           "altogether in April and May.\nThe answer is 72.")
    bad = [("<<48/2=25>>", "does not evaluate"), ("<<48/2*37/37=24>>", "number 37 in"), ("<<48/x=24>>", "not arithmetic")]
    for ann, why in bad:
        with pytest.raises(data.Rejected, match=why):
            data.rule_teacher(dict(p, solution=p["solution"].replace("<<48/2=24>>", ann)))
    with pytest.raises(data.Rejected, match="no <<expr=value>>"):
        data.rule_teacher(dict(p, solution="It is 72.\n#### 72"))
    with pytest.raises(data.Rejected, match="answer 73"):
        data.rule_teacher(dict(p, answer="73"))
    # the CLI path: a GSM8K-format file in, pairs and rejections out
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(NATALIA) + "\n" + json.dumps(dict(NATALIA, answer="It is 72.\n#### 72")) + "\n")
    out = tmp_path / "comt.jsonl"
    assert data.main(["teach", "--teacher", "rule", "--problems", str(src), "--out", str(out)]) == 0
    pairs, rej = read(out), read(tmp_path / "comt.rejected.jsonl")
    assert [r["id"] for r in pairs] == ["g-1"] and pairs[0]["eos"] is False and [r["id"] for r in rej] == ["g-2"]


def test_programmatic_teacher_cli(world, tmp_path):
    for kind in ("comt", "cot"):
        out = tmp_path / f"{kind}.jsonl"
        assert data.main(["teach", "--problems", str(world["out"] / "world/train.jsonl"), "--out", str(out),
                          "--kind", kind]) == 0
        assert out.read_bytes() == (world["out"] / f"{kind}.jsonl").read_bytes()
        assert read(tmp_path / f"{kind}.rejected.jsonl") == []
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(NATALIA) + "\n")
    assert data.teach(data.TeacherConfig(problems=str(src), out=str(tmp_path / "x.jsonl")))["rejected"] == 1
    assert "no 'program' field" in read(tmp_path / "x.rejected.jsonl")[0]["reason"]


def test_rule_teacher_on_world_problems(world):
    rows = world["splits"]["train"][:200] + world["splits"]["ood_deep"][:50]
    for p in rows:
        m = data.rule_teacher(p)
        assert m.count("\nFind ") == p["steps"] and m.endswith(".\nExecution:\n")
        assert data.find_computed_numbers(m, p["question"]) == []
        assert len(re.findall(r" = ", m)) == p["steps"]


def test_rule_teacher_on_real_gsm8k(shared):
    problems = data.load_problems(shared / "datasets/gsm8k/train.jsonl")
    assert len(problems) == 7473 and problems[0]["intermediates"] == ["24", "72"] and problems[0]["answer"] == "72"
    ok, reasons = [], []
    for p in problems[:400]:
        try:
            ok.append((p, data.rule_teacher(p)))
        except data.Rejected as e:
            reasons.append(str(e))
    assert len(ok) >= 0.6 * 400, reasons[:10]
    for p, m in ok:
        assert m.startswith("Plan:\n") and m.endswith("Execution:\n")
        assert data.find_computed_numbers(m, p["question"]) == []
        qv = data.question_values(p["question"])
        mv = [v for _, _, v in confidence.number_spans(m, fractions=True)]
        same = confidence.same_value
        for c in map(float, p["intermediates"]):                                 # no computed value leaks in
            assert any(same(c, q) for q in qv) or not any(same(c, v) for v in mv), (c, m)
    assert all(reasons) and all(data.extract_answer(data.rule_teacher(p, "cot")) == p["answer"] for p, _ in ok[:50])


# ----------------------------------------------------------------------------- the openai teacher

class FakeTeacher(http.server.ThreadingHTTPServer):
    daemon_threads = True
    mode = "mixed"
    calls: dict


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "teacher-x"
        content = body["messages"][0]["content"]
        assert content.startswith(data.COMT_INSTRUCTION)
        key = re.search(r"Question: (\w+)", content).group(1)
        calls = self.server.calls
        calls[key] = calls.get(key, 0) + 1
        self.server.auth = self.headers.get("Authorization")
        mode = "good" if self.server.mode == "good" and key != "number" else key
        if mode == "flaky":
            mode = "fail" if calls[key] == 1 else "good"
        try:
            if mode == "slow":
                time.sleep(1.5)
            if mode in ("fail", "notfound"):
                self.send_error(500 if mode == "fail" else 404)
                return
            payload = (b"<html>oops" if mode == "garbage" else json.dumps({"choices": [{"message": {"content":
                       "Let apples be the apples Tom has.\napples = bags * each = 6 * 4 = 24." if mode == "number" else
                       "Plan:\nLet bags be the bags and each the apples per bag.\napples = bags * each.\nExecution:\n"
                       "junk"}}]}).encode())
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    srv = FakeTeacher(("127.0.0.1", 0), Handler)
    srv.calls = {}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_openai_teacher(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    keys = ["good", "good2", "good3", "slow", "fail", "garbage", "flaky", "number", "notfound"]
    probs = [{"id": k, "question": f"{k} Tom has 6 bags with 4 apples each. How many apples?", "answer": "24"} for k in keys]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in probs))
    # the Handler keys on the first word after "Question: "; keys like "good2" are words too
    out = tmp_path / "comt.jsonl"
    cfg = data.TeacherConfig(teacher="openai", problems=str(src), out=str(out), teacher_model="teacher-x",
                             teacher_url=f"http://127.0.0.1:{server.server_address[1]}/v1", workers=4, timeout=0.5,
                             retries=1, backoff=0.01, api_key_env="TEACHER_KEY")
    stats = data.teach(cfg)
    assert server.auth == "Bearer sk-test"
    pairs, rej = read(out), read(tmp_path / "comt.rejected.jsonl")
    assert sorted(r["id"] for r in pairs) == ["flaky", "good", "good2", "good3"]
    assert stats == {"written": 4, "rejected": 1, "transport": 4, "skipped": 0}
    why = {r["id"]: (r["kind"], r["reason"]) for r in rej}
    assert set(why) == {"slow", "fail", "garbage", "number", "notfound"}
    assert why["number"] == ("invalid", "computed number 24 in the meta-thought")
    assert why["fail"][0] == why["slow"][0] == why["garbage"][0] == "transport"
    assert "HTTP 500" in why["fail"][1] and "not a chat completion" in why["garbage"][1] and "2 attempts" in why["slow"][1]
    assert pairs[0]["completion"] == ("Plan:\nLet bags be the bags and each the apples per bag.\napples = bags * each."
                                      "\nExecution:\n") and pairs[0]["eos"] is False
    assert server.calls["flaky"] == 2 and server.calls["good"] == 1 and server.calls["fail"] == 2
    assert why["notfound"] == ("transport", f"HTTP 404 from {cfg.teacher_url}/chat/completions (1 attempts)")
    assert server.calls["notfound"] == 1                                       # a 404 is not retried in the run
    # resume with a healthy server: only the transport failures are asked again; nothing duplicated
    server.mode, server.calls = "good", {}
    stats = data.teach(cfg)
    assert stats == {"written": 4, "rejected": 0, "transport": 0, "skipped": 5}
    assert set(server.calls) == {"slow", "fail", "garbage", "notfound"}
    ids = [r["id"] for r in read(out)]
    assert len(ids) == len(set(ids)) == 8 and "number" not in ids
    # a third run asks nothing; a torn last line (a kill mid-write) is cut and its problem asked again
    server.calls = {}
    assert data.teach(cfg)["written"] == 0 and server.calls == {}
    last = read(out)[-1]["id"]
    out.write_bytes(out.read_bytes()[:-10])
    assert data.teach(cfg)["written"] == 1 and server.calls == {last: 1}
    ids = [r["id"] for r in read(out)]
    assert len(ids) == len(set(ids)) == 8 and ids[-1] == last


def test_openai_teacher_unreachable(tmp_path):
    probs = [{"id": "a", "question": "Q 1?", "answer": "1"}]
    cfg = data.TeacherConfig(teacher="openai", out=str(tmp_path / "o.jsonl"), teacher_url="http://127.0.0.1:9/v1",
                             retries=0, timeout=1)
    assert data.teach(cfg, problems=probs)["transport"] == 1
    assert read(tmp_path / "o.rejected.jsonl")[0]["reason"].startswith("no answer from http://127.0.0.1:9/v1/chat/completions")
    # On the command line a run that got no answer at all fails (exit 2), so a script does not go on to train
    # on an empty file.
    (tmp_path / "p.jsonl").write_text(json.dumps(probs[0]) + "\n")
    rc = data.main(["teach", "--teacher", "openai", "--teacher-url", "http://127.0.0.1:9/v1", "--retries", "0",
                    "--timeout", "1", "--problems", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "c.jsonl")])
    assert rc == 2


def test_local_teacher(tmp_path, world):
    import torch
    import model as model_py
    import tokenizer as tok_py
    tok = tok_py.train_bpe(world["pretrain"][:200], 300)
    ck = tmp_path / "ck"
    torch.manual_seed(0)
    cfg = model_py.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=512)
    model_py.Transformer(cfg).save_pretrained(ck)
    tok.save(ck)
    probs = world["splits"]["test_id"][:5]
    tc = data.TeacherConfig(teacher="local", ckpt=str(ck), out=str(tmp_path / "m.jsonl"), batch_size=2, max_tokens=12,
                            local_prompt="plain")
    stats = data.teach(tc, problems=probs)
    assert stats["written"] + stats["rejected"] == 5
    done = [r["id"] for r in read(tmp_path / "m.jsonl")] if stats["written"] else []
    rej = [r["id"] for r in read(tmp_path / "m.rejected.jsonl")] if stats["rejected"] else []
    assert sorted(done + rej) == sorted(p["id"] for p in probs)
    assert data.teach(tc, problems=probs)["skipped"] == 5                     # resumable like the openai teacher
    texts = ["Plan:\nx = a + b.", "The answer is 12."]
    assert world_py.length_stats(texts, str(ck)) == {"tokens": sum(len(tok.encode(x)) for x in texts) / 2}
    assert world_py.length_stats(texts) == {"chars": 16.5, "words": 5.0}
    with pytest.raises(data.DataError, match="--tokenizer"):
        world_py.length_stats(texts, str(tmp_path / "none"))


# ----------------------------------------------------------------------------- malformed input

@pytest.mark.parametrize("lines,msg", [
    (['{"id": "a", "question": "Q?", "answer": "1"}', '{"id": "b", "question": '], ":2: not valid JSON"),
    (['{"id": "a", "answer": "1"}'], ":1: missing field 'question'"),
    (['{"id": "a", "question": "Q?", "answer": "1"}', "", '{"id": "c", "question": "Q?", "answer": "many"}'],
     ":3: answer 'many' is not a number"),
    (['{"id": "a", "question": "Q?", "answer": "1"}', '{"id": "a", "question": "R?", "answer": "2"}'],
     ":2: id 'a' already used on line 1"),
    (["[1, 2]"], ":1: expected a JSON object"),
])
def test_malformed_problems(tmp_path, lines, msg):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{src}{msg}")):
        data.load_problems(src)


def test_cli_bad_input_exits_2_and_keeps_output(tmp_path):
    src, out = tmp_path / "bad.jsonl", tmp_path / "cot.jsonl"
    src.write_text('{"question": "Q?", "answer": "1"}\n{"question": "R?", "answer": "two"}\n')
    out.write_text("keep me\n")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "teach", "--teacher", "rule", "--kind", "cot",
                        "--problems", str(src), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {src}:2: answer 'two' is not a number\n"
    assert out.read_text() == "keep me\n"
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "convert", "--format", "svamp", "--in",
                        str(tmp_path / "nope.json"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().endswith("nope.json: file not found") and r.stderr.count("\n") == 1
    assert data.main(["--n-train", "0", "--out", str(tmp_path / "w")]) == 2
    # An existing output is replaced only with --overwrite (teach's programmatic / rule teachers, convert).
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "Q?", "answer": "1", "solution": "1 + 0 = <<1+0=1>>1\\n#### 1"}\n')
    for args in (["teach", "--teacher", "rule", "--kind", "cot", "--problems", str(good)],
                 ["convert", "--format", "problems", "--in", str(good)]):
        r = subprocess.run([sys.executable, str(ROOT / "data.py"), *args, "--out", str(out)], capture_output=True,
                           text=True)
        assert (r.returncode, r.stderr) == (2, f"error: --out {out}: exists; pass --overwrite to replace it\n")
        assert out.read_text() == "keep me\n"
        assert data.main([*args, "--out", str(out), "--overwrite"]) == 0 and out.read_text() != "keep me\n"
        out.write_text("keep me\n")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "convert", "--format", "gsm8k", "--in", str(good),
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (2, f"error: --out {tmp_path}: is a directory; expected the path of a .jsonl file\n")


def test_unreadable_and_misshapen_files_are_named(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "Q?", "answer": "1"}\n{"question": "caf\xe9?", "answer": "2"}\n')
    with pytest.raises(data.DataError, match=re.escape(f"{latin1}:2: not UTF-8 text")):
        data.load_problems(latin1)
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"question": "Q?", "answer": "1"}\n{"question": "R?", "answer": "2"}\n')
    with pytest.raises(data.DataError, match=re.escape(f"{lines}:2: not one JSON document (Extra data); expected "
                                                       f"one JSON array of SVAMP items")):
        benchmarks.convert("svamp", lines)  # JSON lines given where SVAMP's single array is expected
    with pytest.raises(data.DataError, match=re.escape(f"{latin1}: not one JSON document (not UTF-8)")):
        benchmarks.convert("svamp", latin1)
    obj = tmp_path / "obj.json"
    obj.write_text('{"1": {}}')
    with pytest.raises(data.DataError, match=re.escape(f"{obj}: a JSON dict; expected one JSON array")):
        benchmarks.convert("svamp", obj)


def test_every_flag_has_its_config_comment_as_help():
    import ppo
    import sft
    for cls in (data.TeacherConfig, world_py.WorldConfig, sft.SFTConfig, ppo.PPOConfig):
        helps = data.field_comments(cls)
        assert set(helps) <= {f.name for f in dataclasses.fields(cls)}
        assert len(helps) >= len(dataclasses.fields(cls)) - 6, cls  # a few self-explanatory fields go without
    helps = data.field_comments(sft.SFTConfig)
    assert helps["replay_frac"] == "share of the training examples drawn from replay (when replay is set)"
    assert helps["out"].startswith("checkpoint directory written (atomically)") and "beta1" not in helps
    assert data.field_comments(ppo.PPOConfig)["alpha"] == "CCRL: +alpha * confidence for a correct computed number"
    ap = argparse.ArgumentParser()
    data.config_flags(ap, sft.SFTConfig)
    text = ap.format_help()
    assert "share of the training examples drawn from replay (when replay is set) (default: 0.5)" in " ".join(text.split())
    assert vars(ap.parse_args(["--resume", "--lr", "3e-4"]))["resume"] is True
    assert vars(ap.parse_args(["--no-resume"]))["resume"] is False and vars(ap.parse_args([]))["lr"] == 1e-3



# ----------------------------------------------------------------------------- real benchmarks

def test_loaders(shared, tmp_path):
    d = shared / "datasets"
    cases = {  # format, file, count, skipped
        "gsm8k": ("gsm8k/test.jsonl", 1319, 0), "svamp": ("svamp/SVAMP.json", 1000, 0),
        "asdiv": ("asdiv/tora/test.jsonl", None, None), "mawps": ("mawps/tora/test.jsonl", 2065, 0),
        "tabmwp": ("tabmwp/problems_test1k.json", 751, 249), "gsm_hard": ("gsm_hard/gsmhardv2.jsonl", 1319, 0),
        "gsm_symbolic": ("gsm_symbolic/GSM_p2.jsonl", 2500, 0)}
    got = {}
    for fmt, (f, n, skip) in cases.items():
        problems, skipped = benchmarks.convert(fmt, d / f)
        if n is not None:
            assert (len(problems), skipped) == (n, skip), fmt
        assert all(data.parse_number(p["answer"]) is not None for p in problems)
        assert len({p["id"] for p in problems}) == len(problems)
        got[fmt] = problems
    asdiv = got["asdiv"]
    assert 2000 < len(asdiv) < 2215 and asdiv[0]["question"] == ("Seven red apples and two green apples are in the "
                                                                 "basket. How many apples are in the basket?")
    assert asdiv[0]["answer"] == "9" and asdiv[0]["intermediates"] == ["9"]
    xml, skipped = benchmarks.convert("asdiv", d / "asdiv/ASDiv.xml")
    assert len(xml) + skipped == 2305 and xml[0]["answer"] == "9"
    sv = got["svamp"][0]
    assert (sv["answer"], sv["intermediates"], sv["solution"]) == ("51", ["51"], "76 - 25 = <<76-25=51>>51")
    tab = {p["id"]: p for p in got["tabmwp"]}["tabmwp-16"]
    assert tab["answer"] == "84" and tab["intermediates"][-2:] == ["672", "84"] and "Braden | 76" in tab["question"]
    hard = got["gsm_hard"][0]
    assert hard["answer"] == "-9867630" and hard["intermediates"] == ["13", "-4933815", "-9867630"]
    assert sum(bool(p["intermediates"]) for p in got["gsm_hard"]) > 1200
    assert got["gsm_symbolic"][0]["answer"] == "32.5" and got["gsm_symbolic"][0]["id"] == "gsm_symbolic-0-0"
    gsm = got["gsm8k"]
    for p in gsm:                                                               # intermediates = annotation results
        assert p["intermediates"] == [data.format_number(data.parse_number(v)) for _, v in data.annotations(p["solution"])]
    for f in ("mawpsaddsub", "mawpssingleeq", "mawpssingleop", "mawpsmultiarith"):
        assert len(benchmarks.convert("mawps", d / f"mawps/pal/{f}.jsonl")[0]) in (395, 508, 562, 600)
    out = tmp_path / "g.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "convert", "--format", "gsm8k", "--in",
                        str(d / "gsm8k/test.jsonl"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "1319 problems" in r.stdout
    assert data.load_problems(out) == gsm
