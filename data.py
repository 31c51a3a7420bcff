"""data.py: the problem format, answers, teachers and SFT sets for CoMT (stage 1 of arXiv 2601.21909).

Stage 1 of the paper is a data transformation: a teacher rewrites each solution as a *meta-thought*,
the strategy in words with every quantity a named variable and no computed number. This file owns the
formats every stage reads and writes, reads answers, validates and runs the teachers, and is the
command line of the stage. The problems come from world.py (the embedded synthetic world, whose
families are in families.py) or from benchmarks.py (real benchmarks converted).

Run
    python data.py                      # the embedded default under data/ (world.py; seconds, one core)
    python data.py teach --teacher rule --problems gsm8k/train.jsonl --out comt.jsonl
    python data.py teach --teacher openai --teacher-url http://host:8000/v1 --teacher-model M \\
        --problems train.jsonl --out comt.jsonl          # key from $OPENAI_API_KEY; resumable
    python data.py convert --format gsm8k --in gsm8k/test.jsonl --out gsm8k_test.jsonl   # benchmarks.py

Problems (.jsonl, one object a line): id, question, answer (a number, as a string), intermediates
(gold value of every step, strings), solution (worked solution with GSM8K annotations
`5 * 3 = <<5*3=15>>15`), source; world problems add their family and computation graph (world.py).
load_problems also reads GSM8K's own lines ({"question", "answer": "... #### 72"}) as they are.

Texts (the tokenizer renders BOS + prompt + completion [+ EOS]; digits are single tokens):
  prompt     "Question: {question}\n"
  CoT        a sentence per step with its numbers, then the answer line:
             "The number of bags is 5 and the number of apples in each bag is 3, so the number of
             apples in all the bags is 5 * 3 = 15.\n...\nThe answer is 15."
  CoMT       the meta-thought: what each given is, then the strategy as formulas over the names,
             no number at all (the programmatic teacher writes not even the question's numbers):
             "Plan:\nLet bags be the number of bags.\nLet per_bag be the number of apples in each bag.\n
             apples = bags * per_bag.\n...\nThe answer is apples.\nExecution:\n"
             written as {"prompt", "completion", "eos": false}: the completion is a prefix the
             student continues, so the SFT loss covers exactly the meta-thought and no EOS.
  Execution  what follows "Execution:\n", in the base corpus and in the student's answers:
             "bags = 5\nper_bag = 3\napples = bags * per_bag = 5 * 3 = 15\nThe answer is 15."
Our interpretation (the paper is silent): SFT supervises the meta-thought; execution is a base skill,
taught by the base corpus and adapted by RL. Every answer ends with exactly "The answer is N.".
world.py writes these texts for world problems from their computation graphs.

Teachers (python data.py teach): programmatic (world problems' graphs), rule (abstraction of any
annotated solution, e.g. GSM8K train, offline), openai (any OpenAI-compatible server; concurrent,
retried, resumable, validated), local (a checkpoint through model.py). Rejections, with the reason,
go to <out>.rejected.jsonl.

Computed number (validator): a number in a meta-thought whose value is not among the question's
values. Numbers in text are read by confidence.py, as CCRL reads them, with a bare fraction a/b as one
number (`number_spans(text, fractions=True)`): integers, decimals, thousands separators, negatives
where the minus cannot be a subtraction; digits inside identifiers do not count. Counters up to 20
("Step 2", list markers "2." / "2)" at a line start, ordinals "3rd") are labels, not numbers. The
question's values are confidence.question_values: its numbers, its number words ("three", "half" = 2
and 0.5), the value of every bare fraction and mixed number it writes, each percentage as a share and
100, and a number with its scale word ("three hundred" = 300).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import MISSING, dataclass, fields
from pathlib import Path


@dataclass
class TeacherConfig:
    teacher: str = "programmatic"  # programmatic | rule | openai | local
    kind: str = "comt"             # comt (meta-thought) | cot (worked solution with numbers)
    problems: str = ""             # problems .jsonl (ours, or GSM8K's own lines)
    out: str = ""                  # output .jsonl; rejections go to <out>.rejected.jsonl
    limit: int = 0                 # only the first N problems (0 = all)
    teacher_url: str = "http://127.0.0.1:8000/v1"  # OpenAI-compatible base URL (or .../chat/completions)
    teacher_model: str = "meta-llama/Llama-3.1-70B-Instruct"  # the paper's teacher
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (unset: no header)
    workers: int = 8               # concurrent requests
    timeout: float = 60.0          # seconds per request
    retries: int = 4               # extra attempts after a failed request (timeouts, 5xx, garbage)
    backoff: float = 1.0           # seconds before the first retry, doubled each time
    max_tokens: int = 512          # teacher answer budget
    temperature: float = 0.0       # teacher sampling temperature
    ckpt: str = ""                 # local teacher: checkpoint directory (model.py + tokenizer.py)
    batch_size: int = 16           # local teacher: prompts per generate() call
    local_prompt: str = "instruction"  # local teacher: "instruction" (the paper's) | "plain" ("Question: q\n")
    overwrite: bool = False        # programmatic / rule: replace an existing out (openai and local continue it)


# The paper's teacher instruction (CoMT), quoted; the CoT one is ours, for the CoT-SFT baseline.
COMT_INSTRUCTION = ("Solve this problem by describing the REASONING STEPS in natural language using "
                    "only variable names. Do NOT calculate any specific numbers.")
COT_INSTRUCTION = ("Solve this problem step by step, writing out every calculation with its numbers. "
                   "End with a line of the form 'The answer is N.'")


class DataError(ValueError):
    """Bad input: the message is one line naming the file, the line and what was expected."""


# ---------------------------------------------------------------------------------------------
# Numbers and answers
# ---------------------------------------------------------------------------------------------
# One number written alone (an answer): optional minus, digits with or without thousands separators,
# an optional decimal part and "/denominator", or a bare ".5". Numbers inside text are confidence.py's.
_ANSWER_NUM = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")


def _num_value(s: str) -> float | None:
    s = s.replace(",", "")
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b) if float(b) else None
        return float(s)
    except ValueError:
        return None


def parse_number(s) -> float | None:
    """One number written alone: '1,234', '-5', '3.5', '.5', '3/4', '1 1/2', '$5', '50%'."""
    if isinstance(s, (int, float)):
        return None if isinstance(s, bool) or not math.isfinite(s) else float(s)
    s = str(s).strip().rstrip(".").strip().lstrip("$").rstrip("%").strip()
    m = re.fullmatch(r"(-?\d+) (\d+)/(\d+)", s)             # mixed number
    if m and int(m.group(3)):
        whole = int(m.group(1))
        return whole + math.copysign(int(m.group(2)) / int(m.group(3)), whole or 1)
    m = _ANSWER_NUM.fullmatch(s)
    return _num_value(s) if m else None


def format_number(v: float) -> str:
    """Canonical answer string: integers without '.0', others to 12 significant digits."""
    if abs(v - round(v)) < 1e-9 * max(1.0, abs(v)):
        return str(int(round(v)))
    s = f"{v:.12g}"
    if "e" in s:   # no exponent notation: '2.0107e-06' -> '0.0000020107'
        s = f"{v:.{max(0, 11 - math.floor(math.log10(abs(v))))}f}".rstrip("0").rstrip(".")
    return s


def normalize_answer(s) -> str | None:
    """A benchmark answer as a canonical number string, units and separators removed; None if the
    answer is not a number ('9 (apples)' -> '9', '$1,200.50' -> '1200.5', '3/4' -> '0.75')."""
    v = parse_number(s)
    if v is None:
        m = re.match(r"\s*\$?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)\s*(%|\([^()]*\)|[A-Za-z][\w ./-]*)?\s*$",
                     str(s))
        v = _num_value(m.group(1)) if m else None
    return None if v is None else format_number(v)


def extract_answer(response_text: str) -> str | None:
    """The N of the last 'The answer is N.' line; None when there is none."""
    found = re.findall(r"The answer is\s*(.*?)\s*$", response_text or "", flags=re.M)
    if not found:
        return None
    ans = found[-1].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def answers_match(pred, gold) -> bool:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None or g is None:
        return False
    p, g = float(p), float(g)
    return abs(p - g) <= 1e-6 * max(1.0, abs(g))


def grade_answer(response_text: str, gold) -> bool | None:
    """Whether a response's final answer is right: None when it has no parsable one (no 'The answer is'
    line, or a last one without a number, like the plan's "The answer is hay." of a CoMT response that
    stopped before executing its plan), else whether its number equals gold."""
    pred = extract_answer(response_text)
    return None if normalize_answer(pred) is None else answers_match(pred, gold)


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
        ast.Pow: lambda a, b: a ** b if abs(b) <= 12 else _bad()}


def _bad():
    raise ValueError("unsupported expression")


def safe_eval(expr, names: dict | None = None, steps: list | None = None) -> float:
    """Evaluate + - * / // % ** (small powers) over numbers and known names with ast, never eval().
    If steps is a list, the value of every operation is appended to it (post-order)."""
    node = ast.parse(expr.strip(), mode="eval").body if isinstance(expr, str) else expr
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and names is not None and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = safe_eval(node.operand, names, steps)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = safe_eval(node.left, names, steps), safe_eval(node.right, names, steps)
        try:
            v = _OPS[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError) as e:
            raise ValueError(str(e)) from None
        if steps is not None:
            steps.append(v)
        return v
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


_ANN = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def annotations(solution: str) -> list[tuple[str, str]]:
    """The (expression, stated value) of every <<expr=value>> annotation."""
    return [(m.group(1), m.group(2)) for m in _ANN.finditer(solution or "")]


def strip_annotations(solution: str) -> str:
    return re.sub(r"<<[^<>]*>>", "", solution)


# ---------------------------------------------------------------------------------------------
# Problems files
# ---------------------------------------------------------------------------------------------
def problem_from(obj, where, default_id, source="unknown"):
    """One problems-format dict from a line of ours or of GSM8K ('answer' ending in '#### N')."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with id, question, answer")
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}' (expected a problem with id, question, answer)")
    q, ans = obj["question"], obj["answer"]
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    p = dict(obj)
    if isinstance(ans, str) and "####" in ans:   # GSM8K's own format: the worked solution, then #### N
        p["solution"], ans = ans, ans.rsplit("####", 1)[1].strip()
        source = "gsm8k" if source == "unknown" else source
    norm = normalize_answer(ans) if isinstance(ans, (str, int, float)) and not isinstance(ans, bool) else None
    if norm is None:
        raise DataError(f"{where}: answer {ans!r} is not a number")
    p["answer"] = norm
    p["id"] = str(obj.get("id", default_id))
    p.setdefault("solution", "")
    if not isinstance(p.get("intermediates"), list):
        values = [parse_number(s) for _, s in annotations(p["solution"])]
        p["intermediates"] = [format_number(v) for v in values if v is not None]
    p["intermediates"] = [str(x) for x in p["intermediates"]]
    p.setdefault("source", source)
    return p


def read_jsonl(path) -> list[tuple[int, object]]:
    """(line number, object) for every non-blank line of a .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(p, "rb") as f:  # decoded line by line, so that an error can name its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text; expected JSON lines in UTF-8") from None
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
    return rows


def load_problems(path) -> list[dict]:
    """A problems .jsonl (ours, or GSM8K's own lines) as dicts with id, question, answer (canonical
    number string), intermediates (strings), solution, source, plus whatever else the line holds."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no problems in the file")
    out, ids = [], {}
    for n, obj in rows:
        p = problem_from(obj, f"{path}:{n}", f"{Path(path).stem}-{n}")
        if p["id"] in ids:
            raise DataError(f"{path}:{n}: id {p['id']!r} already used on line {ids[p['id']]}")
        ids[p["id"]] = n
        out.append(p)
    return out


def check_out_file(path, overwrite: bool):
    """An output .jsonl path: not a directory, and not an existing file unless overwrite."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--out {path}: is a directory; expected the path of a .jsonl file")
    if path.exists() and not overwrite:
        raise DataError(f"--out {path}: exists; pass --overwrite to replace it")


def write_jsonl(path, rows):
    """Atomically: path.tmp, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Prompts and the validator
# ---------------------------------------------------------------------------------------------
def prompt_text(problem) -> str:
    """The prompt every stage uses: 'Question: {question}\\n'."""
    return f"Question: {problem['question'] if isinstance(problem, dict) else problem}\n"


def sft_pair(problem, completion, kind):
    pair = {"id": problem["id"], "prompt": prompt_text(problem), "completion": completion}
    if kind == "comt":
        pair["eos"] = False     # a prefix the student continues: no EOS after "Execution:\n"
    return pair


# Numbers in text are confidence.py's, so the validator rejects every number that CCRL would score as
# computed. confidence is imported where it is used: it loads torch, which reading problems does not need.
def question_values(question: str) -> list[float]:
    """The values a question states: confidence.question_values (its numbers, the values of its fractions
    and percentages, number words), the very list CCRL's computed numbers are judged against."""
    import confidence
    return confidence.question_values(question)


def find_computed_numbers(text: str, question: str) -> list[str]:
    """The numbers of text (as written; a bare a/b is one number) whose value the question does not state.
    Counters (confidence.is_counter: "Step 2", a line-leading "2." or "2)", "3rd") up to 20 label the
    steps; a larger one counts as a number, so that a label cannot hide a computed value."""
    import confidence
    qv = question_values(question)
    return [text[n.start:n.end] for n in confidence.number_spans(text, fractions=True)
            if not (confidence.is_counter(text, n.start, n.end) and int(text[n.start:n.end]) <= 20)
            and not any(confidence.same_value(n.value, v) for v in qv)]


class Rejected(Exception):
    """A teacher answer that fails validation; str() is the reason recorded in *.rejected.jsonl."""


def check_meta_thought(meta_thought: str, question: str) -> str:
    body = meta_thought.replace("Plan:", "").replace("Execution:", "").strip()
    if not body:
        raise Rejected("empty meta-thought")
    bad = find_computed_numbers(meta_thought, question)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise Rejected(f"computed number {bad[0]} in the meta-thought{more}")
    return meta_thought


def check_cot(cot: str, answer: str) -> str:
    pred = extract_answer(cot)
    if pred is None:
        raise Rejected("no final 'The answer is N.' line")
    if not answers_match(pred, answer):
        raise Rejected(f"final answer {pred} is not the gold answer {answer}")
    return cot


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------
def programmatic_teacher(problem, kind="comt") -> str:
    """From the computation graph: CoT with every number, CoMT with variables only."""
    prog = problem.get("program")
    if not prog:
        raise Rejected("no 'program' field: the programmatic teacher needs world problems (try --teacher rule)")
    import world   # world.py imports this module: imported here, the import runs one way
    if kind == "cot":
        return world.program_solution(prog, annotate=False)
    return check_meta_thought(world.program_plan(prog), problem["question"])


_STOP = set("a an the of to for and in on at per each every her his their its is are was were with from by than as "
            "that this he she they it so then there which who what how many much more less total all she's he's".split())
_CONVENTIONS = (1, 2, 3, 4, 7, 10, 12, 24, 30, 52, 60, 100, 1000, 365, 0.5, 0.25, 0.75, 0.1)
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(v: float) -> str:
    """A constant in words, so a meta-thought can name it without writing a number: 0.25 -> 'one quarter'."""
    if v < 0:
        return "minus " + number_words(-v)
    if v != int(v):
        special = {0.5: "one half", 0.25: "one quarter", 0.75: "three quarters"}
        if v in special:
            return special[v]
        whole, frac = f"{v:.6f}".rstrip("0").split(".")
        return number_words(int(whole)) + " point " + " ".join(_ONES[int(d)] for d in frac)
    n = int(v)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    for size, word in ((10 ** 6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return number_words(n // size) + " " + word + (" " + number_words(rest) if rest else "")


def _name_from(text, taken, fallback):
    """A variable name from the first content words of text: 'clips in May.' -> 'clips_may'."""
    words = []
    for w in re.findall(r"[A-Za-z]+|\d", re.split(r"[.?!;\n]", text, maxsplit=1)[0]):
        if w.isdigit():
            break
        if w.lower() not in _STOP and len(w) > 1:
            words.append(w.lower())
    base = "_".join(words[:2]) or fallback
    name, k = base, 0
    while name in taken:   # rule_teacher puts the number words in taken: no variable named 'two'
        name, k = f"{base}_{'bcdefghijklmnopqrstuvwxyz'[k % 25]}" + ("" if k < 25 else "_" + "x" * (k // 25)), k + 1
    taken.add(name)
    return name


def _phrase(text, limit=6):
    """The start of text, as written, up to a punctuation mark, a digit or `limit` words."""
    stop = re.search(r"[,.?!;:\n]|\d", text)
    s = text[:stop.start()] if stop else text
    words = list(re.finditer(r"[A-Za-z']+", s))[:limit]
    return s[:words[-1].end()] if words else ""


def rule_teacher(problem, kind="comt") -> str:
    """Abstraction of an annotated solution (GSM8K <<a*b=c>>): every question number and every computed
    value becomes a named variable; constants the question states in words or by convention (60 minutes,
    100 for percentages) are written in words; anything else is rejected with the number named."""
    q, sol, answer = problem["question"], problem.get("solution") or "", problem["answer"]
    if kind == "cot":
        lines = [ln for ln in strip_annotations(sol).splitlines()
                 if ln.strip() and not ln.startswith("####") and not ln.startswith("The answer is")]
        return check_cot("\n".join(lines + [f"The answer is {answer}."]), answer)
    anns = list(_ANN.finditer(sol))
    if not anns:
        raise Rejected("no <<expr=value>> annotations in the solution")
    import confidence
    spans = confidence.number_spans(q, fractions=True)
    allowed = set(question_values(q)) | {float(x) for x in _CONVENTIONS}
    taken, lets, steps, given, computed = set(confidence.NUMBER_WORDS), [], [], {}, []

    def given_var(i):
        if i not in given:
            s, e, _ = spans[i]
            snippet = _phrase(q[e:])
            given[i] = _name_from(snippet, taken, "value")
            lets.append(f'Let {given[i]} be the number in "{q[s:e]}{snippet}".')
        return given[i]

    def symbol(v, expr):
        for cv, var in reversed(computed):
            if confidence.same_value(cv, v):
                return ast.Name(var)
        for i, (_, _, qv) in enumerate(spans):
            if confidence.same_value(qv, v):
                return ast.Name(given_var(i))
        for i, (_, _, qv) in enumerate(spans):
            if confidence.same_value(qv, v * 100):
                return ast.BinOp(ast.Name(given_var(i)), ast.Div(), ast.Name("one hundred"))
        if any(confidence.same_value(a, v) for a in allowed):
            return ast.Name(number_words(v))
        raise Rejected(f"number {format_number(v)} in <<{expr}>> is neither in the question nor computed before")

    class Sym(ast.NodeTransformer):
        def __init__(self, expr):
            self.expr = expr

        def visit_Constant(self, node):
            return symbol(float(node.value), self.expr)

    for m in anns:
        expr, stated = m.group(1).strip(), m.group(2)
        try:
            tree = ast.parse(expr, mode="eval")
            val = safe_eval(tree.body)
        except (SyntaxError, ValueError):
            raise Rejected(f"annotation <<{expr}={stated}>> is not arithmetic") from None
        sv = parse_number(stated)
        if sv is None or not math.isclose(sv, val, rel_tol=1e-4, abs_tol=1e-4):
            raise Rejected(f"annotation <<{expr}={stated}>> does not evaluate to its stated value")
        rhs = ast.unparse(Sym(expr).visit(tree))
        desc = _phrase(re.sub(r"^\s*\$?-?[\d.,]*\d%?", "", sol[m.end():])).strip()
        if not desc:   # "... she earned 0.2 x 50 = $<<0.2*50=10>>10.": the words before the numbers
            before = re.findall(r"[A-Za-z']{2,}", sol[sol.rfind("\n", 0, m.start()) + 1:m.start()])
            desc = " ".join(before[-3:])
        var = _name_from(desc, taken, "step")
        desc = desc or "the next value"
        steps.append(f"Find {desc}: {var} = {rhs}.")
        computed.append((val, var))
    gold = parse_number(answer)
    final = next((var for cv, var in reversed(computed) if gold is not None and confidence.same_value(cv, gold)), None)
    if final is None:
        raise Rejected(f"the answer {answer} is not the result of any annotated step")
    text = "\n".join(["Plan:"] + lets + steps + [f"The answer is {final}.", "Execution:", ""])
    return check_meta_thought(text, q)


def llm_completion(problem, answer_text, kind):
    """An LLM answer as our completion: the meta-thought up to any 'Execution:', framed as the plan."""
    t = (answer_text or "").strip()
    if kind == "cot":
        return check_cot(t, problem["answer"])
    t = re.sub(r"^```\w*\n?|\n?```$", "", t.split("Execution:")[0].strip()).strip()
    t = re.sub(r"^Plan:\s*", "", t)
    return check_meta_thought(f"Plan:\n{t}\nExecution:\n", problem["question"])


class PairWriter:
    """Append-only, resumable output of a teacher: one line per problem, flushed as it completes.
    Problems already in out are skipped; so are those in the rejected file, except transport
    failures (timeouts, HTTP errors), which a rerun tries again. A torn last line (a kill mid-write)
    is cut off before appending."""

    def __init__(self, out, kind):
        self.out, self.kind = Path(out), kind
        self.rej = self.out.with_name(self.out.name.removesuffix(".jsonl") + ".rejected.jsonl")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.done = {r["id"] for r in self._read(self.out)}
        self.final = {r["id"] for r in self._read(self.rej) if r.get("kind") != "transport"}
        self.stats = {"written": 0, "rejected": 0, "transport": 0, "skipped": 0}
        self._f, self._r = None, None

    @staticmethod
    def _read(path):
        if not path.exists():
            return []
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            print(f"warning: {path}: cutting off a torn last line ({len(raw) - keep} bytes)", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(keep)
            raw = raw[:keep]
        rows = []
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line))
                rows[-1]["id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: expected a JSON object with an 'id' (earlier teacher output)") from None
        return rows

    def todo(self, problems):
        out = [p for p in problems if p["id"] not in self.done and p["id"] not in self.final]
        self.stats["skipped"] = len(problems) - len(out)
        return out

    def _append(self, which, obj):
        if which == "out":
            self._f = self._f or open(self.out, "a", encoding="utf-8")
            f = self._f
        else:
            self._r = self._r or open(self.rej, "a", encoding="utf-8")
            f = self._r
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()

    def write(self, problem, completion):
        self._append("out", sft_pair(problem, completion, self.kind))
        self.done.add(problem["id"])
        self.stats["written"] += 1

    def reject(self, problem, reason, kind="invalid", answer=None):
        self._append("rej", {"id": problem["id"], "kind": kind, "reason": reason, "answer": answer})
        self.stats["transport" if kind == "transport" else "rejected"] += 1

    def close(self):
        for f in (self._f, self._r):
            if f:
                f.close()


class _Transient(Exception):
    """A failed request: retried with backoff (retry=False: only on a rerun), then recorded as transport."""

    def __init__(self, msg, retry=True):
        super().__init__(msg)
        self.retry = retry


def chat_completion(cfg: TeacherConfig, content: str) -> str:
    """One request to an OpenAI-compatible /chat/completions endpoint; the answer's text."""
    url = cfg.teacher_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    body = json.dumps({"model": cfg.teacher_model, "messages": [{"role": "user", "content": content}],
                       "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=cfg.timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:   # 4xx but 408/429 will not change within this run
        raise _Transient(f"HTTP {e.code} from {url}", retry=e.code >= 500 or e.code in (408, 429)) from None
    except (OSError, ValueError) as e:   # URLError, timeouts, resets, a bad URL
        raise _Transient(f"no answer from {url}: {getattr(e, 'reason', e)}") from None
    try:
        text = json.loads(raw)["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError
        return text
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(f"{url} answered something that is not a chat completion: {raw[:60]!r}") from None


def openai_teacher(problems, cfg: TeacherConfig, writer: PairWriter):
    instruction = COT_INSTRUCTION if cfg.kind == "cot" else COMT_INSTRUCTION

    def ask(p):   # in a worker thread: (status, completion or reason, raw answer)
        for attempt in range(cfg.retries + 1):
            try:
                answer = chat_completion(cfg, f"{instruction}\n\nQuestion: {p['question']}")
            except _Transient as e:
                if attempt == cfg.retries or not e.retry:
                    return "transport", f"{e} ({attempt + 1} attempts)", None
                time.sleep(cfg.backoff * 2 ** attempt * (1 + 0.1 * random.random()))   # jitter spreads workers
                continue
            try:
                return "ok", llm_completion(p, answer, cfg.kind), answer
            except Rejected as e:
                return "invalid", str(e), answer

    with ThreadPoolExecutor(max(1, cfg.workers)) as ex:
        futures = {ex.submit(ask, p): p for p in problems}
        try:
            for f in as_completed(futures):
                status, text, answer = f.result()
                if status == "ok":
                    writer.write(futures[f], text)
                else:
                    writer.reject(futures[f], text, status, answer)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def local_teacher(problems, cfg: TeacherConfig, writer: PairWriter):
    """Any checkpoint through model.py / tokenizer.py (imported here, only when used), batched."""
    import torch
    from model import Transformer, generate
    from tokenizer import Tokenizer
    tok, model = Tokenizer.load(cfg.ckpt), Transformer.from_pretrained(cfg.ckpt).eval()
    instruction = COT_INSTRUCTION if cfg.kind == "cot" else COMT_INSTRUCTION
    stop = set(tok.stop_ids)
    for i in range(0, len(problems), cfg.batch_size):
        batch = problems[i:i + cfg.batch_size]
        prompts = [tok.render(prompt_text(p) if cfg.local_prompt == "plain" else
                              f"{instruction}\n\nQuestion: {p['question']}\n")[0] for p in batch]
        with torch.no_grad():
            gen = generate(model, prompts, cfg.max_tokens, temperature=cfg.temperature, stop_ids=stop,
                           pad_id=tok.pad_id)
        for row, p in enumerate(batch):
            ids = [t for t, m in zip(gen.tokens[row].tolist(), gen.mask[row].tolist()) if m and t not in stop]
            answer = tok.decode(ids)
            try:
                writer.write(p, llm_completion(p, answer, cfg.kind))
            except Rejected as e:
                writer.reject(p, str(e), "invalid", answer)


def teach(cfg: TeacherConfig, problems=None) -> dict:
    """Run one teacher over a problems file into cfg.out (+ .rejected.jsonl). Returns counts."""
    if cfg.teacher not in ("programmatic", "rule", "openai", "local") or cfg.kind not in ("comt", "cot"):
        raise DataError(f"--teacher {cfg.teacher} --kind {cfg.kind}: expected programmatic|rule|openai|local "
                        f"and comt|cot")
    if not cfg.out:
        raise DataError("--out is required: the output .jsonl")
    if cfg.limit < 0:
        raise DataError(f"--limit {cfg.limit}: expected a count >= 0 (0 = all)")
    problems = problems if problems is not None else load_problems(cfg.problems)
    problems = problems[:cfg.limit] if cfg.limit else problems
    check_out_file(cfg.out, cfg.overwrite or cfg.teacher in ("openai", "local"))
    if cfg.teacher in ("programmatic", "rule"):   # fast and deterministic: rewrite the whole file
        fn = programmatic_teacher if cfg.teacher == "programmatic" else rule_teacher
        pairs, rejected = [], []
        for p in problems:
            try:
                pairs.append(sft_pair(p, fn(p, cfg.kind), cfg.kind))
            except Rejected as e:
                rejected.append({"id": p["id"], "kind": "invalid", "reason": str(e)})
        out = Path(cfg.out)
        write_jsonl(out, pairs)
        write_jsonl(out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl"), rejected)
        return {"written": len(pairs), "rejected": len(rejected)}
    if cfg.teacher == "local" and not cfg.ckpt:
        raise DataError("--teacher local needs --ckpt DIR")
    writer = PairWriter(cfg.out, cfg.kind)
    try:
        todo = writer.todo(problems)
        (openai_teacher if cfg.teacher == "openai" else local_teacher)(todo, cfg, writer)
    finally:
        writer.close()
    return writer.stats


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def field_comments(cls) -> dict[str, str]:
    """The comment at the end of each field's line in a config dataclass's source: every script documents
    its flags there, once, and --help shows it."""
    import inspect
    import io
    import tokenize
    comments, name, depth = {}, None, 0
    for t in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if t.type == tokenize.INDENT:
            depth += 1
        elif t.type == tokenize.DEDENT:
            depth -= 1
        elif t.type == tokenize.NAME and name is None and depth == 1 and t.start[1] > 0:
            name = t.string  # the first name on a line of the class body: the field, if a ":" follows
        elif t.type == tokenize.COMMENT and name:
            comments[name] = t.string.lstrip("#").strip()
        if t.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return comments


def config_flags(parser, cls):
    """A flag for every field of a config dataclass: `max_steps` is --max-steps, of the default's type;
    a bool is a switch (--resume / --no-resume); a list or tuple takes several values. The help is the
    field's comment, with its default."""
    helps = field_comments(cls)
    for f in fields(cls):
        d = f.default if f.default_factory is MISSING else f.default_factory()
        kw = dict(default=d, help=helps.get(f.name, "").replace("%", "%%"))
        if isinstance(d, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(d, (list, tuple)):
            kw.update(nargs="+", type=type(d[0]) if d else str)
        else:
            kw["type"] = type(d)
        action = parser.add_argument("--" + f.name.replace("_", "-"), **kw)
        if "%(default)" not in action.help:  # (BooleanOptionalAction adds it itself before Python 3.14)
            action.help += " (default: " + ('""' if d == "" else "%(default)s") + ")"


def main(argv=None) -> int:
    import benchmarks   # both import this module: imported here, the import runs one way
    import world
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["build"] + argv
    ap = argparse.ArgumentParser(description="Problems, teachers and SFT sets for CoMT (see the module docstring).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    config_flags(sub.add_parser("build", help="the embedded default under --out (the default command)"), world.WorldConfig)
    config_flags(sub.add_parser("teach", help="SFT pairs from a problems file with a teacher"), TeacherConfig)
    c = sub.add_parser("convert", help="a benchmark file into the problems format")
    c.add_argument("--format", required=True, choices=benchmarks.FORMATS)
    c.add_argument("--in", dest="inp", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        t0 = time.time()
        if args.cmd == "build":
            cfg = world.WorldConfig(**{f.name: getattr(args, f.name) for f in fields(world.WorldConfig)})
            print(world.summary(cfg, world.build_world(cfg), time.time() - t0))
        elif args.cmd == "teach":
            cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in fields(TeacherConfig)})
            s = teach(cfg)
            print(f"{cfg.teacher} teacher ({cfg.kind}) -> {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
            if cfg.teacher == "openai" and s["transport"] and not s["written"] and not s["rejected"]:
                raise DataError(f"--teacher-url {cfg.teacher_url}: no request was answered ({s['transport']} failed; "
                                f"the reasons are in the rejected file); expected an OpenAI-compatible server")
        else:
            problems, skipped = benchmarks.convert(args.format, args.inp)
            check_out_file(args.out, args.overwrite)
            write_jsonl(args.out, problems)
            print(f"{args.format}: {len(problems)} problems -> {args.out}"
                  + (f" ({skipped} skipped: answer not a number)" if skipped else ""))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # world.py and benchmarks.py import this file as the module `data`; main() runs from that module too,
    # so that the DataError they raise is the one it catches (not a second copy of the class in __main__).
    import data
    sys.exit(data.main())
