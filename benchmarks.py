"""benchmarks.py: real benchmarks as problems in data.py's format, with gold intermediates where the source has them.

The paper evaluates on GSM8K, SVAMP, AsDiv, MAWPS, TabMWP, GSM-Hard and GSM-Symbolic. Each source has its
own layout; convert() reads one file of it and returns problems (id, question, answer as a canonical
number string, intermediates, solution, source) that every later stage reads with data.load_problems.

Run
    python data.py convert --format gsm8k --in gsm8k/test.jsonl --out gsm8k_test.jsonl

Formats (--format)
  problems, gsm8k  ours, or GSM8K's own lines ("answer": "... #### 72"): intermediates from the
                   <<a*b=c>> annotations of the solution
  svamp            SVAMP.json: Body + Question; the Equation becomes annotated steps
  asdiv            ASDiv.xml or ToRA's jsonl: body + question; the Formula becomes annotated steps;
                   multi-answer items ("3;4") are skipped
  mawps            jsonl with input / target
  tabmwp           problems_*.json: title, table and question in one question; numeric answers only
  gsm_hard         jsonl with input / target / code: the PAL program's operations, interpreted with ast
                   (never executed), are the intermediates
  gsm_symbolic     jsonl of instances: id gsm_symbolic-{template}-{instance}
Items whose answer is not a number (ASDiv's "3:30 p.m.", TabMWP's text answers) are skipped and counted.
"""
import ast
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from data import DataError, format_number, normalize_answer, parse_number, problem_from, read_jsonl, safe_eval


_SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def equation_steps(expr: str):
    """An equation such as '( 76.0 - 25.0 ) / 3' as GSM8K-annotated steps and their values
    (innermost first). Units in parentheses ('2 (hour)*60 (min/hour)') are dropped."""
    expr = re.sub(r"\(\s*[A-Za-z][^()]*\)", "", expr)
    node = ast.parse(expr.strip(), mode="eval").body
    lines, values = [], []

    def walk(n):
        if isinstance(n, ast.BinOp) and type(n.op) in _SYM:
            a, b = walk(n.left), walk(n.right)
            v = safe_eval(ast.BinOp(ast.Constant(a), n.op, ast.Constant(b)))
            fa, fb, fv, s = format_number(a), format_number(b), format_number(v), _SYM[type(n.op)]
            lines.append(f"{fa} {s} {fb} = <<{fa}{s}{fb}={fv}>>{fv}")
            values.append(fv)
            return v
        return safe_eval(n)

    walk(node)
    return "\n".join(lines), values


def _formula(p, formula):
    """Gold steps from a formula 'a+b=c; c*2=d' where every part parses; none otherwise."""
    try:
        parts = [equation_steps(x.split("=")[0]) for x in formula.split(";") if "=" in x]
    except (SyntaxError, ValueError):
        parts = []
    if parts:
        p["solution"] = "\n".join(s for s, _ in parts)
        p["intermediates"] = [v for _, vs in parts for v in vs]
    return p


def pal_intermediates(code: str, target: float) -> list[str]:
    """Every operation's value in a PAL program (GSM-Hard), interpreted with ast, never executed.
    Empty when the program does anything but assignments of arithmetic, or disagrees with target."""
    try:
        fn = next(n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef))
        env, vals = {}, []
        for st in fn.body:
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                env[st.targets[0].id] = safe_eval(st.value, env, vals)
            elif isinstance(st, ast.Return):
                ok = math.isclose(safe_eval(st.value, env), target, rel_tol=1e-6, abs_tol=1e-6)
                return [format_number(v) for v in vals] if ok else []
            else:
                return []
    except (SyntaxError, ValueError, StopIteration, TypeError, RecursionError):
        pass
    return []


FORMATS = ("problems", "gsm8k", "svamp", "asdiv", "mawps", "tabmwp", "gsm_hard", "gsm_symbolic")


def convert(fmt: str, path) -> tuple[list[dict], int]:
    """A benchmark file as problems. Returns (problems, skipped): skipped counts items whose answer is
    not a number (ASDiv's '3:30 p.m.', TabMWP's text answers, ASDiv's multi-answer items)."""
    path, stem, out, skipped = str(path), Path(path).stem, [], 0
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")

    def add(where, pid, question, answer, **extra):
        nonlocal skipped
        a = normalize_answer(answer) if not isinstance(answer, bool) else None
        if a is None or not str(question).strip():
            skipped += 1
            return None
        p = {"id": pid, "question": " ".join(str(question).split(" ")).strip(), "answer": a, "intermediates": [],
             "solution": "", "source": fmt, **extra}
        out.append(p)
        return p

    def load_json(kind, expected):  # one JSON document (SVAMP.json, TabMWP's problems_*.json), not JSON lines
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise DataError(f"{path}{where}: not one JSON document ({getattr(e, 'msg', 'not UTF-8')}); expected "
                            f"{expected}") from None
        if not isinstance(doc, kind):
            raise DataError(f"{path}: a JSON {type(doc).__name__}; expected {expected}")
        return doc

    def need(obj, where, *keys):
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise DataError(f"{where}: expected an object with fields {', '.join(keys)}")
        return obj

    if fmt in ("problems", "gsm8k"):
        out = [problem_from(o, f"{path}:{n}", f"{fmt}-{stem}-{i}", source=fmt if fmt == "gsm8k" else "unknown")
               for i, (n, o) in enumerate(read_jsonl(path))]
    elif fmt == "gsm_symbolic":
        for n, o in read_jsonl(path):
            need(o, f"{path}:{n}", "question", "answer")
            p = problem_from(o, f"{path}:{n}", f"gsm_symbolic-{o.get('id')}-{o.get('instance')}", source=fmt)
            p["id"] = f"gsm_symbolic-{o.get('id')}-{o.get('instance')}"
            p["source"] = fmt
            out.append(p)
    elif fmt == "svamp":
        data = load_json(list, "one JSON array of SVAMP items (SVAMP.json)")
        for i, o in enumerate(data):
            need(o, f"{path}: item {i}", "Body", "Question", "Answer")
            body = o["Body"].strip()
            body += "" if body.endswith((".", "?", "!", ",")) else "."
            p = add(f"{path}: item {i}", f"svamp-{o.get('ID', i)}", f"{body} {o['Question'].strip()}", o["Answer"])
            if p and o.get("Equation"):
                _formula(p, o["Equation"] + "=")
    elif fmt == "asdiv":
        if path.endswith(".xml"):
            try:
                items = [(e.get("ID"), e.findtext("Body", ""), e.findtext("Question", ""), e.findtext("Answer", ""),
                          e.findtext("Formula", "")) for e in ET.parse(path).getroot().iter("Problem")]
            except ET.ParseError as e:
                raise DataError(f"{path}:{e.position[0]}: not valid XML ({e})") from None
        else:
            items = [(o.get("idx", n - 1), o["body"], o["question"], o["answer"], o.get("formula", ""))
                     for n, o in read_jsonl(path) if need(o, f"{path}:{n}", "body", "question", "answer")]
        for pid, body, question, answer, formula in items:
            p = add(path, f"asdiv-{pid}", f"{body.strip()} {question.strip()}", answer if ";" not in answer else "")
            if p and formula:
                _formula(p, formula)
    elif fmt == "mawps":
        for i, (n, o) in enumerate(read_jsonl(path)):
            need(o, f"{path}:{n}", "input", "target")
            add(f"{path}:{n}", f"mawps-{o.get('type', stem)}-{o.get('idx', i)}", o["input"], o["target"])
    elif fmt == "tabmwp":
        data = load_json(dict, "one JSON object of TabMWP problems by id (problems_*.json)")
        for pid, o in data.items():
            need(o, f"{path}: problem {pid}", "question", "answer", "table")
            if o.get("ans_type") not in ("integer_number", "decimal_number"):
                skipped += 1
                continue
            q = "\n".join(x for x in (o.get("table_title"), o["table"], o["question"]) if x)
            if o.get("choices"):
                q += "\nChoices: " + ", ".join(map(str, o["choices"]))
            p = add(path, f"tabmwp-{pid}", q, o["answer"], unit=o.get("unit"))
            if p:
                p["solution"] = o.get("solution") or ""
                p["intermediates"] = [format_number(v) for s in re.findall(r"=\s*\$?(-?[\d,]*\.?\d+)", p["solution"])
                                      if (v := parse_number(s)) is not None]
    elif fmt == "gsm_hard":
        for i, (n, o) in enumerate(read_jsonl(path)):
            need(o, f"{path}:{n}", "input", "target")
            p = add(f"{path}:{n}", f"gsm_hard-{i}", o["input"], o["target"])
            if p and isinstance(o.get("code"), str):
                p["intermediates"] = pal_intermediates(o["code"], float(o["target"]))
    else:
        raise DataError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if not out:
        raise DataError(f"{path}: no {fmt} problems found")
    return out, skipped
