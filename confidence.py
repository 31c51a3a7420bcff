"""
CCRL's pieces (Confidence-Calibrated Reinforcement Learning, paper §3.2), as pure functions.

What CCRL is, as far as the paper is known (notes/paper-details.md §4): PPO from the CoMT checkpoint
with a reward that combines the correctness of the final answer with a confidence term on every
*computed number* in the rollout: a number the policy wrote that is not in the question. Being
confident and right earns a little; being confident and wrong costs more ("be confident when correct,
uncertain when erring"), so overconfident intermediate errors stop cascading into wrong answers.
Confidence comes from the entropy of the policy's token distribution over that number's tokens.

The paper gives no formulas for any of this. Our choices, each a function below:
- number: a run of digits with optional thousands separators and decimals ("1,234.5", ".5"); a minus
  is a sign only where it cannot be a subtraction (see `number_spans`); "%" is not part of it; digits
  glued to a letter or "_" before them ("x2", "per_bag2") are part of an identifier, not a number;
  "3/4" is two numbers, 3 and 4 (a slash in a solution is nearly always a division whose operands are
  quantities; `fractions=True` reads a bare "a/b" as one number instead).
- counters are not quantities: "Step 2", line-leading enumerators "1." / "2)", ordinals "3rd".
- computed number (`computed_numbers`): a number whose value does not occur in the question, compared
  as floats with a tolerance (15 == 15.0). "Occurs in the question" also counts number words ("three",
  "twenty-five", "dozen", "twice", "half" = 2 and 0.5) and 100 when the question has a percentage.
  Only the FIRST occurrence of each computed value counts: the place where the model produced it;
  later mentions ("36 - 5" after "= 36", "The answer is 31") are copies whose entropy measures copying.
  This also bounds the bonus a rollout can collect (at most alpha * |gold values|): repeating a correct
  number is not a way to earn reward.
- correctness (`number_is_correct`): the value is among the problem's gold intermediates or answer.
- confidence (`confidence`): c = exp(-mean_i H_i) over the number's tokens (default), or
  c = 1 - mean_i H_i / log V; see the comment in `confidence` for why exp.
- reward (`ccrl_reward`), placed on tokens: outcome 1 (right) / 0 (wrong) / `penalty` (no parsable
  answer, or no EOS) at the last response token, plus +alpha*c for each correct and -beta*c for each
  wrong computed number at the number's last token, beta > alpha (defaults 0.1 / 0.2). The per-token KL
  penalty is added by ppo.py, not here.
ppo.py calls `ccrl_reward_from_rollout` (or `ccrl_reward` on numbers it scored itself); eval.py calls
`score_computed_numbers` for the overconfidence statistics.

Worked example. Question "Tom has 3 boxes of 12 apples. He eats 5 of them. How many are left?",
gold intermediates [36], answer 31. Rollout (one digit per token in the embedded tokenizer):
    "3 * 12 = 36. 36 - 5 = 30. The answer is 30.<EOS>"
numbers 3, 12, 36, 36, 5, 30, 30. Extracted (in the question): 3, 12, 5. Computed: the first 36 and the
first 30; the second 36 and the 30 after "is" are copies. Say the tokens "3","6" of the first 36 were
sampled with entropies 0.1 and 0.3 nats: c = exp(-0.2) = 0.819, correct, +0.1 * 0.819 = +0.0819 on
the token "6". The tokens "3","0" of the first 30 had entropies 0.0 and 0.4: c = exp(-0.2) = 0.819,
wrong, -0.2 * 0.819 = -0.1637 on the token "0". The answer 30 is wrong: outcome 0 on <EOS>.
Had the model been unsure of the 0 (entropy 2.0: c = exp(-1.0) = 0.368) it would lose only 0.0736.
"""
import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

ALPHA = 0.1  # reward scale for a correct computed number (times its confidence)
BETA = 0.2  # penalty scale for a wrong computed number; must exceed ALPHA (overconfident errors cost more)
PENALTY = -1.0  # outcome score of a rollout with no parsable answer or no EOS (LHP / TRL "EOS trick")
REL_TOL = 1e-6  # two numbers are the same value when they agree to this relative tolerance


class ConfidenceError(ValueError):
    """Bad input to the CCRL functions; the message is one line naming what was expected."""


# ----------------------------------------------------------------------------- numbers in text

class TextNumber(NamedTuple):
    start: int  # first character of the number (its sign included)
    end: int  # one past the last character
    value: float


# A number starts neither inside an identifier ("x2", "per_bag2") nor right after a decimal point
# ("1.2.3" is not 1.2 and .3). Digits are ASCII only: \d would also match other scripts' digits.
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])"  # 1,234 and 12,345,678: thousands separators
    r"|[0-9]+"  # 42
    r"|(?=\.[0-9]))"  # .5: a decimal with no leading digit
    r"(?:\.[0-9]+)?"  # decimal part; "42." at a sentence end stays 42
)
_MINUS = "-\u2212"  # hyphen-minus and the Unicode minus sign
_OPERATORS = "([{=<>+-*/\u00d7\u00f7:;,\u2212"  # after these a minus is a sign: "= -7", "(-7)", "3*-2"
_ENDS_OPERAND = ")]}%"  # ...but after these (or a digit) it subtracts: "(5) -3", "5 -3"


def _minus_is_sign(text: str, p: int) -> bool:
    """Is the minus at text[p] (directly followed by a digit) a sign rather than a subtraction?

    "5 - 3", "5-3", "x-3", "10-year" subtract or hyphenate; "-7", "= -7", "(-7)", "is -7" are signs.
    Rule: the character before the minus is the text start, whitespace or an operator, and the last
    non-space character before it does not end an operand (a digit or a closing bracket). A letter may
    end an operand too ("x -7"), but in prose "is -7" is far commoner, so a letter allows the sign.
    """
    if p == 0:
        return True
    before = text[p - 1]
    if not (before.isspace() or before in _OPERATORS):
        return False
    q = p - 1
    while q >= 0 and text[q].isspace():
        q -= 1
    return q < 0 or not (text[q].isdigit() or text[q] in _ENDS_OPERAND)


def number_spans(text: str, fractions: bool = False) -> list[TextNumber]:
    """All numbers in `text` as (start_char, end_char, value), left to right.

    fractions=True reads "a/b" (two integers glued to the slash, not part of a longer "a/b/c" or an
    equation "a/b=c") as the single number a/b; the default reads it as a and b.
    """
    spans = []
    for m in _NUMBER.finditer(text):
        start, end = m.span()
        if end < len(text) and text[end] == "_":  # "2_b" is an identifier too
            continue
        value = float(m.group().replace(",", ""))
        if start > 0 and text[start - 1] in _MINUS and _minus_is_sign(text, start - 1):
            start, value = start - 1, -value
        spans.append(TextNumber(start, end, value))
    if fractions:
        spans = _merge_fractions(text, spans)
    return spans


def _merge_fractions(text: str, spans: list[TextNumber]) -> list[TextNumber]:
    out, i = [], 0
    while i < len(spans):
        a = spans[i]
        b = spans[i + 1] if i + 1 < len(spans) else None
        plain = b is not None and re.fullmatch(r"-?[0-9]+", text[a.start:a.end]) and re.fullmatch(
            r"[0-9]+", text[b.start:b.end])
        if (plain and b.start == a.end + 1 and text[a.end] == "/" and b.value != 0
                and text[a.start - 1:a.start] != "/" and text[b.end:b.end + 1] not in ("/", "=")):
            out.append(TextNumber(a.start, b.end, a.value / b.value))
            i += 2
        else:
            out.append(a)
            i += 1
    return out


_COUNTER_BEFORE = re.compile(r"(?i)\bstep\s*#?\s*$")  # "Step 2", "step #3"
_ENUMERATOR_AFTER = re.compile(r"[.)][ \t]+\S")  # "1. Compute", "2) Add"
_BRACKETED_AFTER = re.compile(r"\)[ \t]+[A-Za-z]")  # "(3) Add", but not the quantity in "(8) + 2"
_ORDINAL_AFTER = re.compile(r"(?i)(?:st|nd|rd|th)(?![a-z])")  # 1st, 2nd, 3rd, 4th


def is_counter(text: str, start: int, end: int) -> bool:
    """Is the number text[start:end] a counter (step number, list enumerator, ordinal), not a quantity?"""
    if not re.fullmatch(r"[0-9]+", text[start:end]):
        return False
    before = text[text.rfind("\n", 0, start) + 1:start].strip(" \t")  # the line up to the number
    return bool(_COUNTER_BEFORE.search(text[max(0, start - 16):start])
                or (before == "" and _ENUMERATOR_AFTER.match(text, end))
                or (before == "(" and _BRACKETED_AFTER.match(text, end))
                or _ORDINAL_AFTER.match(text, end))


_WORD_VALUES = {
    "zero": (0,), "one": (1,), "two": (2,), "three": (3,), "four": (4,), "five": (5,), "six": (6,),
    "seven": (7,), "eight": (8,), "nine": (9,), "ten": (10,), "eleven": (11,), "twelve": (12,),
    "thirteen": (13,), "fourteen": (14,), "fifteen": (15,), "sixteen": (16,), "seventeen": (17,),
    "eighteen": (18,), "nineteen": (19,), "twenty": (20,), "thirty": (30,), "forty": (40,),
    "fifty": (50,), "sixty": (60,), "seventy": (70,), "eighty": (80,), "ninety": (90,),
    "hundred": (100,), "thousand": (1000,), "million": (1e6,), "dozen": (12,), "twice": (2,),
    "double": (2,), "thrice": (3,), "triple": (3,), "half": (2, 0.5), "quarter": (4, 0.25),
}
NUMBER_WORDS = frozenset(_WORD_VALUES)  # the words question_values reads as numbers (data.py avoids them as names)
_WORD = re.compile(r"(?i)\b(" + "|".join(_WORD_VALUES) + r")(?:[- ](one|two|three|four|five|six|seven"
                   r"|eight|nine))?\b")


_SCALED = re.compile(r"(?i)(?<![\w.,])(\d+(?:\.\d+)?|" + "|".join(w for w, v in _WORD_VALUES.items() if 1 <= v[0] <= 90)
                     + r")(?:[- ](one|two|three|four|five|six|seven|eight|nine))?\s+(hundred|thousand|million)\b")
_MIXED = re.compile(r"(?<![\w.,/])(\d+) (\d+)/(\d+)(?![\w/])")  # "1 1/2"
_PERCENT = re.compile(r"(?i)\s*(?:%|per ?cent\b)")


def question_values(question: str) -> list[float]:
    """Every value the question states: its numbers; the value of each bare fraction ("3/4 of them" states
    0.75 as well as 3 and 4) and mixed number ("1 1/2": 1.5); each percentage as a share ("25%": 0.25) and
    100; its number words ("three", "half" = 2 and 0.5); and a number times its scale word ("three
    hundred", "2.5 million")."""
    spans = number_spans(question)
    values = [n.value for n in spans]
    values += [n.value for n in number_spans(question, fractions=True) if "/" in question[n.start:n.end]]
    values += [int(m.group(1)) + int(m.group(2)) / int(m.group(3)) for m in _MIXED.finditer(question) if int(m.group(3))]
    values += [n.value / 100 for n in spans if _PERCENT.match(question, n.end)]
    for m in _SCALED.finditer(question):
        head = m.group(1).lower()
        v = float(head) if head[0].isdigit() else _WORD_VALUES[head][0] + (
            _WORD_VALUES[m.group(2).lower()][0] if m.group(2) else 0)
        values.append(float(v * _WORD_VALUES[m.group(3).lower()][0]))
    for m in _WORD.finditer(question):
        head = _WORD_VALUES[m.group(1).lower()]
        values.extend(float(v) for v in head)
        if m.group(2) and 20 <= head[0] <= 90:  # "twenty-five" is 25 (and 20 and 5)
            unit = _WORD_VALUES[m.group(2).lower()][0]
            values.extend([float(head[0] + unit), float(unit)])
        elif m.group(2):
            values.append(float(_WORD_VALUES[m.group(2).lower()][0]))
    if "%" in question or re.search(r"(?i)\bper ?cent", question):
        values.append(100.0)
    return values


def same_value(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9)


def _contains(values: Sequence[float], v: float) -> bool:
    return any(same_value(v, u) for u in values)


# ----------------------------------------------------------------------------- numbers on tokens

@dataclass(frozen=True)
class NumberSpan:
    start_tok: int  # first response token that holds a character of the number
    end_tok: int  # last such token (inclusive): where the number's reward goes
    value: float
    text: str
    counter: bool = False  # a step number / enumerator / ordinal, never a computed number


def number_token_spans(token_texts: Sequence[Union[str, bytes]], fractions: bool = False) -> list[NumberSpan]:
    """The numbers in a response given as one string (or bytes) per token, located on token positions.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character. Given bytes (exact): the tokens
    are joined and decoded once with "surrogateescape", which turns every undecodable byte into one
    placeholder character, so each character has a known byte length and character offsets map back
    to byte offsets and from there to tokens. Given strings (each token decoded alone, a split
    character showing as U+FFFD): offsets are taken in the joined strings, which is also exact for
    numbers, since digits, ",", "." and "-" are single ASCII bytes that no token boundary can split.
    Only the characters around them may differ: a non-ASCII letter split between tokens reads as two
    U+FFFD, which are not letters, so in "é2" the 2 is a number from strings but part of an identifier
    from bytes. Pass bytes when that matters.
    """
    if all(isinstance(t, bytes) for t in token_texts):
        text = b"".join(token_texts).decode("utf-8", "surrogateescape")
        char_units = [len(c.encode("utf-8", "surrogateescape")) for c in text]  # bytes per character
        tok_units = [len(t) for t in token_texts]
    elif all(isinstance(t, str) for t in token_texts):
        text = "".join(token_texts)
        char_units = [1] * len(text)
        tok_units = [len(t) for t in token_texts]
    else:
        raise ConfidenceError("token_texts: expected all str or all bytes, got a mix")
    char_pos = [0]  # char_pos[i]: unit offset where character i starts
    for u in char_units:
        char_pos.append(char_pos[-1] + u)
    tok_of_unit = []  # tok_of_unit[k]: the token holding byte (or character) k
    for i, u in enumerate(tok_units):
        tok_of_unit.extend([i] * u)
    spans = []
    for n in number_spans(text, fractions=fractions):
        spans.append(NumberSpan(start_tok=tok_of_unit[char_pos[n.start]], end_tok=tok_of_unit[char_pos[n.end] - 1],
                                value=n.value, text=text[n.start:n.end], counter=is_counter(text, n.start, n.end)))
    return spans


def computed_numbers(question: str, response_spans: Sequence[NumberSpan], dedupe: bool = True) -> list[NumberSpan]:
    """The response numbers the model computed: not counters, value not in the question; with dedupe,
    only the first occurrence of each value (later ones are copies of it)."""
    given = question_values(question)
    seen: list[float] = []
    out = []
    for s in response_spans:
        if s.counter or _contains(given, s.value) or (dedupe and _contains(seen, s.value)):
            continue
        seen.append(s.value)
        out.append(s)
    return out


# ----------------------------------------------------------------------------- confidence, correctness

def confidence(entropies: Sequence[float], vocab_size: Optional[int] = None, kind: str = "exp") -> float:
    """Confidence in [0, 1] of a number from the entropies (nats) of the distributions its tokens were
    sampled from.

    kind="exp":  c = exp(-mean H)          (default)
    kind="norm": c = 1 - mean H / log V    (needs vocab_size)

    Why exp: exp(-H) is the "effective probability" of a token, 1/perplexity: 1 for a one-hot
    distribution, 1/k for a uniform one over k choices; and exp(-mean H) is its geometric mean over the
    number's tokens. So thresholds 0.5 / 0.7 / 0.9 read as "effectively fewer than 2 / 1.4 / 1.1
    choices per token", whatever the vocabulary. 1 - H/log V is squeezed against 1 on a real model: with
    the embedded ~4k vocabulary a coin flip between two digits (H = log 2) scores 1 - 0.693/8.32 = 0.92,
    already above the highest threshold, and the scale shifts with V.
    """
    if len(entropies) == 0:
        raise ConfidenceError("confidence: a number needs at least one token entropy, got none")
    h = sum(max(0.0, float(e)) for e in entropies) / len(entropies)  # clamp fp noise below 0
    if kind == "exp":
        return math.exp(-h)
    if kind == "norm":
        if vocab_size is None or vocab_size < 2:
            raise ConfidenceError(f"confidence kind 'norm': expected vocab_size >= 2, got {vocab_size}")
        return max(0.0, 1.0 - h / math.log(vocab_size))
    raise ConfidenceError(f"confidence: unknown kind {kind!r}, expected 'exp' or 'norm'")


def number_is_correct(value: float, gold_values: Sequence[float]) -> bool:
    """A computed number is correct when its value is one of the gold intermediates or the answer."""
    return _contains(gold_values, value)


def gold_values(golds: Sequence[Union[float, int, str]]) -> list[float]:
    """Gold answer and intermediates (numbers or strings like "1,234", "$5", "-7", "12.5%", "3/4") as floats."""
    out = []
    for g in golds:
        if isinstance(g, (int, float)):
            out.append(float(g))
            continue
        found = number_spans(str(g).strip(), fractions=True)
        if len(found) != 1:
            raise ConfidenceError(f"gold value {g!r}: expected exactly one number")
        out.append(found[0].value)
    return out


@dataclass(frozen=True)
class ComputedNumber:
    value: float
    text: str
    start_tok: int  # token positions in the caller's coordinates (row of the rollout tensor)
    end_tok: int  # inclusive; the reward goes here
    correct: bool
    confidence: float


def score_computed_numbers(token_texts: Sequence[Union[str, bytes]], entropies: Sequence[float], question: str,
                           golds: Sequence[Union[float, str]], kind: str = "exp", vocab_size: Optional[int] = None,
                           dedupe: bool = True, fractions: bool = False) -> list[ComputedNumber]:
    """For one response: every computed number with its value, correctness, confidence and token span.
    `entropies[i]` belongs to token i. (eval.py builds the overconfidence statistics from this.)"""
    if len(entropies) < len(token_texts):
        raise ConfidenceError(f"entropies: expected one per token ({len(token_texts)}), got {len(entropies)}")
    gold = gold_values(golds)
    out = []
    for s in computed_numbers(question, number_token_spans(token_texts, fractions), dedupe=dedupe):
        c = confidence(entropies[s.start_tok:s.end_tok + 1], vocab_size=vocab_size, kind=kind)
        out.append(ComputedNumber(s.value, s.text, s.start_tok, s.end_tok, number_is_correct(s.value, gold), c))
    return out


# ----------------------------------------------------------------------------- the reward

def outcome_score(answer_correct: Optional[bool], finished: bool, penalty: float = PENALTY) -> float:
    """1 for a right final answer, 0 for a wrong one, `penalty` without a parsable answer or an EOS."""
    if not finished or answer_correct is None:
        return penalty
    return 1.0 if answer_correct else 0.0


def ccrl_reward(numbers: Sequence[Sequence[ComputedNumber]], outcomes: Sequence[float], mask: torch.Tensor,
                alpha: float = ALPHA, beta: float = BETA) -> tuple[torch.Tensor, list[dict]]:
    """Per-token CCRL scores for a batch, from already scored numbers and outcomes.

    numbers[b]: the computed numbers of row b (token positions index mask's columns); outcomes[b]: its
    outcome score (`outcome_score`); mask (B, T): 1 on response tokens (EOS included).
    Returns scores (B, T) float32, zero off the response: outcomes[b] at row b's last response token,
    +alpha*c / -beta*c at each correct / wrong number's last token; and per row a breakdown dict
    {outcome, confidence_bonus, n_computed, n_correct} for logging.
    alpha = beta = 0 switches the confidence terms off (plain outcome reward; the counts still come).
    """
    if not (alpha == beta == 0 or 0 <= alpha < beta):
        raise ConfidenceError(f"ccrl_reward: expected 0 <= alpha < beta (wrong numbers cost more), "
                              f"got alpha={alpha}, beta={beta}")
    if mask.dim() != 2 or len(numbers) != mask.shape[0] or len(outcomes) != mask.shape[0]:
        raise ConfidenceError(f"ccrl_reward: expected mask (B, T) and B lists of numbers and outcomes, got mask "
                              f"{tuple(mask.shape)}, {len(numbers)} lists, {len(outcomes)} outcomes")
    scores = torch.zeros(mask.shape, dtype=torch.float32)
    mask_cpu = mask.detach().cpu()
    breakdown = []
    for b, (nums, outcome) in enumerate(zip(numbers, outcomes)):
        valid = mask_cpu[b].nonzero().flatten().tolist()
        if not valid:
            raise ConfidenceError(f"ccrl_reward: row {b} has no response token")
        valid_set = set(valid)
        bonus = 0.0
        for n in nums:
            if n.end_tok not in valid_set:
                raise ConfidenceError(f"ccrl_reward: row {b}, number {n.text!r} ends at token {n.end_tok}, "
                                      f"which is not a response token")
            r = alpha * n.confidence if n.correct else -beta * n.confidence
            scores[b, n.end_tok] += r
            bonus += r
        scores[b, valid[-1]] += outcome
        breakdown.append({"outcome": float(outcome), "confidence_bonus": bonus, "n_computed": len(nums),
                          "n_correct": sum(n.correct for n in nums)})
    return scores.to(mask.device), breakdown


def ccrl_reward_from_rollout(tokens: torch.Tensor, mask: torch.Tensor, entropies: torch.Tensor,
                             questions: Sequence[str], golds: Sequence[Sequence[Union[float, str]]],
                             answer_correct: Sequence[Optional[bool]], finished: Sequence[bool],
                             decode_token: Callable[[int], Union[str, bytes]], stop_ids: Sequence[int] = (),
                             alpha: float = ALPHA, beta: float = BETA, penalty: float = PENALTY,
                             kind: str = "exp", vocab_size: Optional[int] = None, dedupe: bool = True,
                             ) -> tuple[torch.Tensor, list[dict], list[list[ComputedNumber]]]:
    """`ccrl_reward` straight from a rollout.

    tokens, mask, entropies (B, T): sampled ids, 1 on response tokens, entropy of each token's sampling
    distribution (model.generate's fields). golds[b]: the gold answer and intermediates of row b.
    answer_correct[b]: whether the final answer matches (None: no parsable answer; data.py judges it).
    finished[b]: whether the row ended with a stop token. decode_token(id): the token's text or bytes;
    ids in stop_ids read as empty text. Returns scores (B, T), breakdown per row, numbers per row.
    """
    B = tokens.shape[0]
    if not (mask.shape == tokens.shape == entropies.shape and len(questions) == len(golds) == B
            and len(answer_correct) == len(finished) == B):
        raise ConfidenceError(f"ccrl_reward_from_rollout: expected tokens, mask, entropies of one shape (B, T) and "
                              f"B questions, golds, answers, finished flags; got {tuple(tokens.shape)}, "
                              f"{tuple(mask.shape)}, {tuple(entropies.shape)}, {len(questions)}, {len(golds)}, "
                              f"{len(answer_correct)}, {len(finished)}")
    stop = set(stop_ids)
    tokens, entropies, mask_cpu = tokens.detach().cpu(), entropies.detach().float().cpu(), mask.detach().cpu()
    numbers, outcomes = [], []
    for b in range(B):
        pos = mask_cpu[b].nonzero().flatten().tolist()  # response positions in the row
        ids = tokens[b, pos].tolist()
        ent = entropies[b, pos].tolist()
        texts = [None if i in stop else decode_token(i) for i in ids]
        empty = b"" if any(isinstance(t, bytes) for t in texts) else ""
        texts = [empty if t is None else t for t in texts]
        found = score_computed_numbers(texts, ent, questions[b], golds[b], kind=kind, vocab_size=vocab_size,
                                       dedupe=dedupe)
        # back from positions within the response to columns of the rollout tensor
        numbers.append([ComputedNumber(n.value, n.text, pos[n.start_tok], pos[n.end_tok], n.correct, n.confidence)
                        for n in found])
        outcomes.append(outcome_score(answer_correct[b], bool(finished[b]), penalty))
    scores, breakdown = ccrl_reward(numbers, outcomes, mask, alpha=alpha, beta=beta)
    return scores, breakdown, numbers
