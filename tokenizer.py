"""Byte-level BPE tokenizer over `tiktoken.Encoding`: the embedded default and real Llama / Qwen files.

One `Tokenizer` class serves every checkpoint the project reads, so the student always sees the ids
its checkpoint was trained with. `Tokenizer.load(path)` takes a directory or a file and detects:

* our own format (written by `save`): `tokenizer.tiktoken` (tiktoken rank file: one
  `base64(token bytes) rank` per line) + `tiktoken_config.json` (pattern, special tokens, BOS/EOS/PAD,
  template, and the rank file's size and sha256, so a changed rank file is caught, not used stale);
* a Llama 3.x `tokenizer.model` (a rank file with 128,000 ranks): specials 128000-128255 in Meta's
  llama-models (3.1+) order and names, Llama-3 split pattern, template "llama3";
* a Qwen-7B `qwen.tiktoken` (151,643 ranks): `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  `<|extra_0..204|>`, single-digit pattern, NFC, template "chatml";
* an HF `tokenizer.json` whose model is byte-level BPE (GPT-2 byte<->unicode alphabet; the vocabulary
  ids become tiktoken ranks, the merges are checked to be in id order; the pre-tokenizer regex and the
  added tokens are taken from the file), with `tokenizer_config.json` beside it for BOS/EOS/PAD;
* the older `vocab.json` + `merges.txt` pair (GPT-2, Qwen2 / 2.5 / 3), specials from
  `tokenizer_config.json`; a `Qwen2Tokenizer` class means the Qwen pattern (digits one by one) + NFC.

Conventions (BOS, EOS, PAD always distinct; PAD equal to EOS would hide EOS from PPO's masks):
* plain (the embedded default): `<|bos|>`, `<|eos|>`, `<|pad|>`; render = BOS + prompt + completion + EOS.
* llama3: BOS `<|begin_of_text|>` 128000, EOS `<|end_of_text|>` 128001, turn end `<|eot_id|>` 128009,
  PAD `<|finetune_right_pad_id|>` 128004, stop ids {128001, 128008, 128009}.
* chatml (Qwen): no BOS (`bos_id` None: `bos=True` adds nothing), EOS = turn end `<|im_end|>` whatever
  the config says, PAD `<|endoftext|>` (Qwen3's own choice), stop ids {im_end, endoftext}.
* any other tokenizer: the plain template with the config's tokens; a PAD equal to EOS is replaced by
  a new `<|pad|>` id after the vocabulary (the model then needs that embedding row).
The tokenizer's `vocab_size` may be smaller than a checkpoint's embedding rows (Qwen pads to 151,936).
Chat templates follow the families' own (Meta's ChatFormat, Qwen's ChatML) with two deliberate
differences: message contents are used verbatim (Meta strips them) and no system turn is invented
(Qwen2.5 adds a default one); headers and contents are encoded separately, so a content that starts
with whitespace may split differently from the whole template string encoded at once.

Special-token text inside data encodes as plain text unless named in `allowed_special`. Texts are
cut for tiktoken the way Meta's llama3 tokenizer does (runs of over 25k whitespace / non-whitespace
characters are sliced; that changes tokens only inside such runs), and texts over 400k characters are
cut only where every supported split pattern has a boundary anyway, so ids equal the uncut encoding.
HF files: tiktoken merges by the rank of the merged bytes, so two merges giving the same bytes, or a
whole word in the vocabulary that its merges would not build, could encode unlike `tokenizers` (the
tests find no difference on the GPT-2 and Qwen files); added tokens with lstrip/rstrip/single_word
are refused.

Run:
    python tokenizer.py train --data data/pretrain.jsonl --vocab-size 4096 --out base/
    python tokenizer.py encode --tokenizer base/ "Tom has 12 apples."
    python tokenizer.py encode --tokenizer base/ --file data/pretrain.jsonl   # throughput
"""
import argparse
import base64
import hashlib
import heapq
import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import regex  # installed with tiktoken (its own dependency); used only to pre-tokenize for training
import tiktoken


@dataclass
class TrainConfig:
    data: str = "data/pretrain.jsonl"  # jsonl with "text", "prompt"+"completion" or "messages" lines
    vocab_size: int = 4096  # ids in all: 256 bytes + merges + the 3 specials (= model embedding rows)
    out: str = "base"  # directory that receives tokenizer.tiktoken + tiktoken_config.json


# Split patterns. Ours is Qwen's: digits one by one, so arithmetic is learned per digit.
DEFAULT_PATTERN = QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DEFAULT_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
RANKS_FILE, CONFIG_FILE = "tokenizer.tiktoken", "tiktoken_config.json"
LLAMA3_RANKS, QWEN_RANKS = 128_000, 151_643
# Meta's llama-models (3.1+) names for ids 128000.. ; the rest are <|reserved_special_token_2..245|>.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
MAX_CHUNK_CHARS = 400_000  # longest text handed to tiktoken in one call (Meta's llama3 limit)
MAX_RUN_CHARS = 25_000  # longest run of whitespace or of non-whitespace BPE sees (tiktoken issue #195)
TEMPLATES = ("plain", "llama3", "chatml")


class TokenizerError(ValueError):
    """Bad tokenizer file or input; the message is one line: where, what is wrong, what was expected."""


class Rendered(tuple):
    """`ids, mask = tok.render(...)` unpacks as a pair; `.truncated` counts the tokens max_len cut."""

    def __new__(cls, ids, mask, truncated=0):
        self = super().__new__(cls, (ids, mask))
        self.truncated = truncated
        return self

    ids = property(lambda self: self[0])
    mask = property(lambda self: self[1])


class Tokenizer:
    def __init__(self, ranks, pattern, special_tokens, *, eos, pad, bos=None, eot=None, stop=None,
                 template="plain", nfc=False, name="bpe"):
        """ranks: {token bytes: id}; special_tokens: {text: id}; eos/pad/bos/eot/stop name specials."""
        eot = eot or eos

        def require(ok, problem):
            if not ok:
                raise TokenizerError(f"{name}: {problem}")
        require(template in TEMPLATES, f"unknown template {template!r}, expected one of {TEMPLATES}")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        require(not missing, f"byte {missing[:1]} has no rank; a byte-level BPE needs all 256 single bytes")
        clash = set(special_tokens.values()) & set(ranks.values())
        require(not clash, f"special token ids {sorted(clash)[:3]} are also BPE ranks")
        for role, tok in [("bos", bos), ("eos", eos), ("eot", eot), ("pad", pad), *(("stop", t) for t in stop or ())]:
            require(tok in special_tokens or (role == "bos" and tok is None), f"{role} {tok!r} is not a special token")
        require(len({bos, eos, pad}) == 3, f"BOS {bos!r}, EOS {eos!r} and PAD {pad!r} must be distinct")
        self.ranks, self.pattern, self.special_tokens = ranks, pattern, dict(special_tokens)
        self.template, self.nfc, self.name = template, nfc, name
        self.names = {"bos": bos, "eos": eos, "eot": eot, "pad": pad, "stop": sorted(set(stop or (eos, eot)))}
        self.enc = tiktoken.Encoding(name=Path(str(name)).name or "bpe", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.bos_id = special_tokens[bos] if bos else None
        self.eos_id, self.eot_id, self.pad_id = special_tokens[eos], special_tokens[eot], special_tokens[pad]
        self.stop_ids = {special_tokens[s] for s in self.names["stop"]}
        self.vocab_size = self.enc.max_token_value + 1
        self._special_re = {}

    def __repr__(self):
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, template={self.template!r}, "
                f"bos={self.bos_id}, eos={self.eos_id}, eot={self.eot_id}, pad={self.pad_id})")

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text, bos=False, eos=False, allowed_special=()):
        """Ids of `text`. Special-token text is plain text unless listed in allowed_special (or "all")."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        allowed = frozenset(self.special_tokens if allowed_special == "all" else allowed_special)
        if not allowed:
            ids += self._ordinary(text)
        else:
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise TokenizerError(f"allowed_special: {sorted(unknown)[0]!r} is not a special token of {self.name}")
            if allowed not in self._special_re:  # longest first, like HF's added-token matcher
                alts = sorted(allowed, key=lambda s: (-len(s), s))
                self._special_re[allowed] = re.compile("|".join(map(re.escape, alts)))
            pos = 0
            for m in self._special_re[allowed].finditer(text):
                ids += self._ordinary(text[pos:m.start()])
                ids.append(self.special_tokens[m.group()])
                pos = m.end()
            ids += self._ordinary(text[pos:])
        if eos:
            ids.append(self.eos_id)
        return ids

    def _ordinary(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if len(text) <= MAX_RUN_CHARS:
            return self.enc.encode_ordinary(text)
        ids = []
        for piece in _pieces(text):
            ids += self.enc.encode_ordinary(piece)
        return ids

    def decode(self, ids):
        """Text of `ids`; an id outside the vocabulary (e.g. an embedding padding row) decodes to U+FFFD."""
        ids = list(ids)
        try:
            return self.enc.decode(ids)  # errors="replace" for cut multi-byte characters
        except KeyError:
            return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The bytes of one id; U+FFFD's bytes for an id outside the vocabulary."""
        try:
            return self.enc.decode_single_token_bytes(i)
        except KeyError:
            return "\ufffd".encode()


    # ---------------------------------------------------------------- rendering training pairs
    def render(self, prompt, completion=None, eos=True, max_len=None):
        """(ids, mask) of one prompt/completion pair in this tokenizer's template.

        mask is 1 exactly on the completion tokens and the token ending it (EOS for plain, the turn end
        <|eot_id|> / <|im_end|> for chat templates); eos=False appends no end (the completion is a prefix
        to continue). completion None: the prompt ready for generation and an all-zero mask.
        max_len cuts the completion from the right and puts the end token back as the last token
        (the EOS is never dropped silently); the returned Rendered also carries `.truncated`, the number
        of tokens cut, so callers count such pairs and may skip them (a cut completion still teaches a
        stop at the cut). A prompt that leaves no room for one completion token raises TokenizerError.
        """
        messages = [{"role": "user", "content": prompt}]
        if completion is not None:
            messages.append({"role": "assistant", "content": completion})
        return self._assemble(self._parts(messages, eos), max_len)

    def render_messages(self, messages, max_len=None):
        """(ids, mask) of a {"messages": [...]} conversation: loss on assistant turns (+ their end)."""
        if not isinstance(messages, list) or not messages:
            raise TokenizerError("messages: expected a non-empty list of {'role', 'content'} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TokenizerError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        return self._assemble(self._parts(messages, True), max_len)

    def _head(self, role, i):
        """Prompt-side tokens that open message i of `role` (nothing in the plain template)."""
        sp = self.special_tokens
        if self.template == "llama3":
            return [sp["<|start_header_id|>"]] + self.encode(role) + [sp["<|end_header_id|>"]] + self.encode("\n\n")
        if self.template == "chatml":  # the "\n" after the previous <|im_end|> opens this turn
            return (self.encode("\n") if i else []) + [sp["<|im_start|>"]] + self.encode(role + "\n")
        return []

    def _parts(self, messages, end_last):
        """[(ids, is_loss, end id or None)]: prompt-side pieces, and assistant turns with their end.
        Headers and contents are encoded separately (as Meta's ChatFormat does), so the loss starts
        exactly at the content's first token."""
        chat = self.template != "plain"
        parts = [([self.bos_id] if self.bos_id is not None else [], False, None)]
        for i, m in enumerate(messages):
            head, body = self._head(m["role"], i), self.encode(m["content"])
            if m["role"] == "assistant":
                end = self.eot_id if end_last or i < len(messages) - 1 else None
                parts += [(head, False, None), (body, True, end)]
            else:
                parts.append((head + body + ([self.eot_id] if chat else []), False, None))
        if chat and messages[-1]["role"] != "assistant":  # ready for generation
            parts.append((self._head("assistant", len(messages)), False, None))
        return parts

    def _assemble(self, parts, max_len):
        ids, mask, spans = [], [], []  # spans: (start, end_index) of loss turns that end with a token
        for seg, loss, end in parts:
            seg = seg + ([end] if end is not None else [])
            if loss and end is not None:
                spans.append((len(ids), len(ids) + len(seg) - 1))
            ids += seg
            mask += [int(loss)] * len(seg)
        if max_len is None or len(ids) <= max_len:
            return Rendered(ids, mask, 0)
        full, n = ids, len(ids)
        ids, mask = full[:max_len], mask[:max_len]
        for start, stop in spans:  # a turn cut in the middle keeps its end token as the last token
            if start < max_len <= stop:
                ids[-1], mask[-1] = full[stop], 1
        if not any(mask):
            raise TokenizerError(f"rendered sequence is {n} tokens and max_len={max_len} leaves no room "
                                 f"for a completion token (prompt part too long)")
        return Rendered(ids, mask, n - max_len)

    # ---------------------------------------------------------------- files
    def save(self, out_dir):
        """Write tokenizer.tiktoken + tiktoken_config.json into out_dir (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ranked = sorted(self.ranks.items(), key=lambda kv: kv[1])
        data = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranked).encode()
        cfg = {"format": "tiktoken-bpe", "version": 1, "ranks_file": RANKS_FILE, "n_ranks": len(ranked),
               "ranks_sha256": hashlib.sha256(data).hexdigest(), "pattern": self.pattern, "nfc": self.nfc,
               "template": self.template, **self.names, "special_tokens": self.special_tokens}
        _atomic_write(out / RANKS_FILE, data)
        _atomic_write(out / CONFIG_FILE, (json.dumps(cfg, indent=1, ensure_ascii=False) + "\n").encode())

    @classmethod
    def from_rank_file(cls, path, pattern, special_tokens, **conventions):
        """A tiktoken rank file of any family, e.g. cl100k_base.tiktoken with its pattern and specials."""
        return cls(read_rank_file(path), pattern, special_tokens, name=str(path), **conventions)

    @classmethod
    def load(cls, path):
        """Detect the format of a directory or a file (see the module docstring) and load it."""
        p = Path(path)
        if p.is_dir():
            for name in (CONFIG_FILE, "tokenizer.json", "vocab.json", "tokenizer.model"):
                if (p / name).is_file():
                    return cls.load(p / name)
            tik = sorted(p.glob("*.tiktoken"))
            if len(tik) == 1:
                return cls.load(tik[0])
            raise TokenizerError(f"{p}: no tokenizer found; expected {CONFIG_FILE}, tokenizer.json, "
                                 "vocab.json + merges.txt, tokenizer.model or one *.tiktoken file")
        if not p.is_file():
            raise TokenizerError(f"{p}: no such file or directory")
        if p.name == CONFIG_FILE:
            return _load_own(p)
        if p.suffix == ".tiktoken" and (p.parent / CONFIG_FILE).is_file():
            return _load_own(p.parent / CONFIG_FILE)
        if p.name in ("vocab.json", "merges.txt"):
            return _load_vocab_merges(p.parent / "vocab.json", p.parent / "merges.txt")
        if p.suffix == ".json":
            return _load_tokenizer_json(p)
        return _load_bare_rank_file(p)


# -------------------------------------------------------------------- readers
def read_rank_file(path, expect_n=None):
    """{token bytes: rank} from a tiktoken rank file, checked line by line (our own parser: tiktoken's
    loader caches even local paths by name and can hand back stale ranks after the file changed)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: not a text rank file (binary; a SentencePiece model?); expected "
                             "lines '<base64 token> <rank>' as in Llama 3's tokenizer.model") from None
    ranks, prev = {}, -1
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise TokenizerError(f"{path}:{n}: expected '<base64 token> <rank>', got {line[:60]!r}")
        try:
            tok = base64.b64decode(fields[0], validate=True)
        except ValueError:
            raise TokenizerError(f"{path}:{n}: {fields[0][:40]!r} is not valid base64") from None
        rank = int(fields[1])
        if rank <= prev:
            what = "duplicate rank" if rank in ranks.values() else "rank out of order"
            raise TokenizerError(f"{path}:{n}: {what} {rank}; expected ranks increasing (previous {prev})")
        if tok in ranks:
            raise TokenizerError(f"{path}:{n}: token {tok!r} already has rank {ranks[tok]}")
        ranks[tok], prev = rank, rank
    if not ranks:
        raise TokenizerError(f"{path}: empty rank file; expected lines '<base64 token> <rank>'")
    if expect_n is not None and len(ranks) != expect_n:
        raise TokenizerError(f"{path}: {len(ranks)} ranks, expected {expect_n} (file truncated or replaced)")
    return ranks


def _read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: byte {e.start} is not UTF-8; expected a text file") from None


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _load_own(path):
    cfg = _read_json(path)
    need = ("ranks_file", "n_ranks", "ranks_sha256", "pattern", "nfc", "template", "bos", "eos", "eot",
            "pad", "stop", "special_tokens")
    lacking = [k for k in need if not isinstance(cfg, dict) or k not in cfg]
    if lacking:
        raise TokenizerError(f"{path}: missing field {lacking[0]!r}; expected a config written by Tokenizer.save")
    rpath = Path(path).parent / cfg["ranks_file"]
    if not rpath.is_file():
        raise TokenizerError(f"{path}: rank file {rpath} does not exist")
    if hashlib.sha256(rpath.read_bytes()).hexdigest() != cfg["ranks_sha256"]:
        raise TokenizerError(f"{rpath}: sha256 differs from {path} (file changed since it was saved)")
    return Tokenizer(read_rank_file(rpath, cfg["n_ranks"]), cfg["pattern"], cfg["special_tokens"],
                     bos=cfg["bos"], eos=cfg["eos"], eot=cfg["eot"], pad=cfg["pad"], stop=cfg["stop"],
                     template=cfg["template"], nfc=cfg["nfc"], name=str(rpath.parent))


def _load_bare_rank_file(path):
    ranks = read_rank_file(path)
    if len(ranks) == LLAMA3_RANKS:
        specials = {s: LLAMA3_RANKS + i for i, s in enumerate(LLAMA3_SPECIALS)}
        return _with_conventions(ranks, LLAMA3_PATTERN, specials, {}, False, path)
    if len(ranks) == QWEN_RANKS:
        specials = {s: QWEN_RANKS + i for i, s in enumerate(QWEN_SPECIALS)}
        return _with_conventions(ranks, QWEN_PATTERN, specials, {}, True, path)
    raise TokenizerError(f"{path}: a rank file with {len(ranks)} ranks is no known family (Llama 3: "
                         f"{LLAMA3_RANKS}, Qwen: {QWEN_RANKS}); use Tokenizer.from_rank_file(path, pattern, specials)")


def _byte_decoder():
    """GPT-2's byte<->unicode alphabet, inverted into a str.translate table (unicode char -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    b2u = {b: chr(b) for b in printable}
    b2u.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in b2u)})
    table = {ord(u): chr(b) for b, u in b2u.items()}
    table.update({c: "\uffff" for c in range(256) if chr(c) not in b2u.values()})  # not in the alphabet
    return table


_U2B = _byte_decoder()


def _hf_ranks(vocab, merges, added, where):
    """Ranks from an HF byte-level BPE vocabulary; the merges must build the tokens in id order."""
    ranks = {}
    for tok, i in vocab.items():
        if tok in added:
            continue
        try:
            b = tok.translate(_U2B).encode("latin-1")
        except UnicodeEncodeError:
            raise TokenizerError(f"{where}: vocabulary token {tok!r} is not in GPT-2's byte-level alphabet; "
                                 "expected a byte-level BPE") from None
        if b in ranks:
            raise TokenizerError(f"{where}: vocabulary tokens {i} and {ranks[b]} are the same bytes")
        ranks[b] = i
    built, last = set(), -1
    for n, (line, (a, b)) in enumerate(merges, 1):
        t = vocab.get(a + b)
        if a not in vocab or b not in vocab or t is None:
            raise TokenizerError(f"{where}:{line}: merge {a!r} + {b!r} gives a token not in the vocabulary")
        if t in built:  # two merges giving the same bytes: tiktoken keeps the first (see docstring)
            continue
        if t < last:
            raise TokenizerError(f"{where}:{line}: merge result id {t} comes after id {last}; expected the "
                                 "merges in vocabulary id order (tiktoken ranks are ids)")
        built.add(t)
        last = t
    unbuilt = sum(len(t) > 1 for t in ranks) - len(built)
    if unbuilt:
        raise TokenizerError(f"{where}: missing merges: {unbuilt} multi-byte vocabulary tokens are built "
                             f"by no merge ({len(merges)} merges read); expected one merge per such token")
    return ranks


def _added_from(entries, where):
    """{content: id} of HF added tokens; flags that change matching are refused (see the docstring)."""
    added = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("content"), str) or not isinstance(e.get("id"), int):
            raise TokenizerError(f"{where}: added token {e!r:.80}: expected {{'id': int, 'content': str, ...}}")
        bad = [k for k in ("lstrip", "rstrip", "single_word") if e.get(k)]
        if bad:
            raise TokenizerError(f"{where}: added token {e['content']!r} sets {bad[0]}, which is not supported")
        added[e["content"]] = e["id"]
    return added


def _load_tokenizer_json(path):
    tj = _read_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: not a known tokenizer format; expected an HF tokenizer.json with a "
                             "BPE model (or our tiktoken_config.json)")
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: BPE model options (byte_fallback / dropout / affixes) are not byte-level BPE")
    if "merges" not in model:
        raise TokenizerError(f"{path}: missing merges: the BPE model has no 'merges' list")
    merges = []
    for n, m in enumerate(model["merges"], 1):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TokenizerError(f"{path}: merge #{n} is {m!r:.60}; expected 'a b' or ['a', 'b']")
        merges.append((f"merge #{n}", pair))
    norm = tj.get("normalizer")
    kinds = [s.get("type") for s in norm.get("normalizers", [])] if norm and norm.get("type") == "Sequence" \
        else [norm.get("type")] if norm else []
    if any(k != "NFC" for k in kinds):
        raise TokenizerError(f"{path}: normalizer {kinds} not supported; expected none or NFC")
    pattern = _hf_pattern(tj.get("pre_tokenizer"), path)
    added = _added_from(tj.get("added_tokens") or [], path)
    ranks = _hf_ranks(model["vocab"], merges, added, path)
    cfg_path = Path(path).parent / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    return _with_conventions(ranks, pattern, added, cfg, bool(kinds), path)


def _hf_pattern(pre, where):
    """The split regex of a byte-level pre-tokenizer: ByteLevel alone (GPT-2's regex), or
    Split(Regex, Isolated) then ByteLevel(use_regex=false) as Llama 3 and Qwen2 files have."""
    steps = (pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]) or []
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    pattern = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern = GPT2_PATTERN
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if isinstance(split.get("pattern"), dict) and isinstance(split["pattern"].get("Regex"), str) \
                and split.get("behavior") == "Isolated" and not split.get("invert"):
            pattern = split["pattern"]["Regex"]
    if pattern is None or steps[-1].get("add_prefix_space"):
        raise TokenizerError(f"{where}: pre_tokenizer {json.dumps(pre)[:120]} not supported; expected "
                             "ByteLevel, or Split(Regex, Isolated) then ByteLevel(use_regex=false)")
    return pattern


def _load_vocab_merges(vocab_path, merges_path):
    if not vocab_path.is_file() or not merges_path.is_file():
        gone = merges_path if vocab_path.is_file() else vocab_path
        raise TokenizerError(f"{gone}: missing; vocab.json and merges.txt must sit side by side")
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_path}: expected a JSON object {{token: id}}")
    merges = []
    for n, line in enumerate(_read_text(merges_path).split("\n"), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{merges_path}:{n}: expected two tokens separated by one space, got {line[:60]!r}")
        merges.append((n, pair))
    cfg_path = vocab_path.parent / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    entries = [{"id": int(i), **e} for i, e in (cfg.get("added_tokens_decoder") or {}).items()]
    named = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    named += cfg.get("additional_special_tokens") or []  # older configs name specials kept in vocab.json
    named = [t.get("content") if isinstance(t, dict) else t for t in named]
    entries += [{"id": vocab[t], "content": t} for t in named if isinstance(t, str) and t in vocab]
    added = _added_from(entries, cfg_path)
    qwen = str(cfg.get("tokenizer_class", "")).startswith("Qwen2")
    ranks = _hf_ranks(vocab, merges, added, merges_path)
    return _with_conventions(ranks, QWEN_PATTERN if qwen else GPT2_PATTERN, added, cfg, qwen, vocab_path.parent)


def _with_conventions(ranks, pattern, specials, cfg, nfc, where):
    """Pick the template and BOS / EOS / PAD / turn end / stop ids from the specials (module docstring)."""
    specials = dict(specials)
    kw = dict(pattern=pattern, nfc=nfc, name=str(where))
    if {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"} <= specials.keys():
        by_id = {i: s for s, i in specials.items()}
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in specials \
            else by_id.get(specials["<|begin_of_text|>"] + 4)  # the same slot in Llama 3.0 names
        stop = [s for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if s in specials]
        return Tokenizer(ranks, special_tokens=specials, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                         eot="<|eot_id|>", pad=pad, stop=stop, template="llama3", **kw)
    if {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= specials.keys():
        return Tokenizer(ranks, special_tokens=specials, eos="<|im_end|>", pad="<|endoftext|>",
                         stop=["<|im_end|>", "<|endoftext|>"], template="chatml", **kw)

    def named(key, fallbacks):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return v if v in specials else next((f for f in fallbacks if f in specials), None)
    eos = named("eos_token", ("<|endoftext|>", "<|eos|>", "</s>", "<eos>"))
    if eos is None:
        raise TokenizerError(f"{where}: cannot tell which token ends a sequence; expected eos_token in "
                             "tokenizer_config.json or an added token such as <|endoftext|> or </s>")
    bos = named("bos_token", ("<|bos|>", "<s>", "<bos>"))
    pad = named("pad_token", ("<|pad|>", "<pad>", "[PAD]"))
    bos = None if bos == eos else bos
    if pad in (None, eos, bos):  # a fresh id after the vocabulary; the model needs that embedding row
        pad = next(f"<|pad{i or ''}|>" for i in range(len(specials) + 1) if f"<|pad{i or ''}|>" not in specials)
        specials[pad] = max([*ranks.values(), *specials.values()]) + 1
    return Tokenizer(ranks, special_tokens=specials, bos=bos, eos=eos, pad=pad, template="plain", **kw)


def _atomic_write(path, data):
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -------------------------------------------------------------------- long texts
# A letter or digit followed by ASCII whitespace: every supported pattern ends a piece there.
_SAFE_CUT = re.compile(r"[^\W_](?=[ \t\r\n])")


def _pieces(text):
    """Substrings of text, in order, that tiktoken can take one at a time (see the module docstring)."""
    pos, n = 0, MAX_RUN_CHARS + 1  # runs are matched from their start only: linear in len(text)
    for m in re.finditer(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (n, n), text):
        yield from _cut_safely(text[pos:m.start()])
        for i in range(m.start(), m.end(), MAX_RUN_CHARS):
            yield text[i:min(i + MAX_RUN_CHARS, m.end())]
        pos = m.end()
    yield from _cut_safely(text[pos:])


def _cut_safely(text):
    while len(text) > MAX_CHUNK_CHARS:
        m = _SAFE_CUT.search(text, MAX_CHUNK_CHARS // 2)
        if m is None:
            break
        yield text[:m.end()]
        text = text[m.end():]
    if text:
        yield text


# -------------------------------------------------------------------- training
def train_bpe(texts, vocab_size, pattern=DEFAULT_PATTERN, specials=DEFAULT_SPECIALS, verbose=False):
    """Byte-level BPE: pre-tokenize with `pattern`, then merge the most frequent adjacent pair until
    vocab_size ids exist (bytes + merges + specials). Pair counts are updated only in the chunks that
    contain the merged pair (index pair -> chunk ids), and a lazy max-heap finds the next pair; ties go
    to the smallest pair of ids, so training is deterministic. specials: (bos, eos, pad) names."""
    n_target = vocab_size - len(specials)
    if n_target < 256:
        raise TokenizerError(f"vocab_size {vocab_size} is below 256 bytes + {len(specials)} specials")
    split = regex.compile(pattern)
    counts = Counter()
    for t in texts:
        counts.update(split.findall(t))
    words = [list(w.encode("utf-8")) for w in counts]  # a chunk as a list of token ids
    freqs = list(counts.values())
    pair_count, where = defaultdict(int), defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for p in zip(word, word[1:]):
            pair_count[p] += f
            where[p].add(w)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    index = {b: i for i, b in enumerate(vocab)}
    t0, steps = time.time(), 0
    while len(vocab) < n_target:
        if not heap:
            raise TokenizerError(f"training text too small: only {len(vocab)} tokens can be formed, "
                                 f"vocab_size {vocab_size} needs {n_target} before the specials")
        neg, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c != -neg:  # stale entry: counts of old pairs only fall, so re-queue with the true count
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        a, b = pair
        merged_bytes = vocab[a] + vocab[b]
        new = index.get(merged_bytes)
        if new is None:  # the same bytes from a different split reuse their id: ranks stay unique
            new = index[merged_bytes] = len(vocab)
            vocab.append(merged_bytes)
        fresh = set()
        for w in where.pop(pair):
            word, f, out, i = words[w], freqs[w], [], 0
            while i < len(word):  # left to right, non-overlapping: "a a a" with (a, a) -> "new a"
                hit = word[i] == a and i + 1 < len(word) and word[i + 1] == b
                out.append(new if hit else word[i])
                i += 2 if hit else 1
            old_pairs, new_pairs = list(zip(word, word[1:])), list(zip(out, out[1:]))
            for p in old_pairs:
                pair_count[p] -= f
            for p in new_pairs:
                pair_count[p] += f
                where[p].add(w)
                if new in p:
                    fresh.add(p)
            for p in set(old_pairs) - set(new_pairs) - {pair}:
                where[p].discard(w)
            words[w] = out
        del pair_count[pair]
        for p in sorted(fresh):
            heapq.heappush(heap, (-pair_count[p], p))
        steps += 1
        if verbose and steps % 1000 == 0:
            print(f"merge {steps}: {len(vocab)}/{n_target} tokens, {time.time() - t0:.1f}s", flush=True)
    ranks = {bts: i for i, bts in enumerate(vocab)}
    bos, eos, pad = specials
    return Tokenizer(ranks, pattern, {s: len(vocab) + i for i, s in enumerate(specials)},
                     bos=bos, eos=eos, pad=pad, template="plain", name="bpe")


# -------------------------------------------------------------------- CLI
def read_texts(path):
    """Training texts from a jsonl file: "text", "prompt"+"completion" or "messages" on each line."""
    texts = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        row = row if isinstance(row, dict) else {}
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            texts.append(row["prompt"] + row["completion"])
        elif isinstance(row.get("messages"), list) and all(isinstance(m, dict) for m in row["messages"]):
            texts.append("\n".join(str(m.get("content", "")) for m in row["messages"]))
        else:
            raise TokenizerError(f"{path}:{n}: expected an object with \"text\", \"prompt\"+\"completion\" "
                                 "or \"messages\"")
    if not texts:
        raise TokenizerError(f"{path}: no texts found")
    return texts


def _throughput(tok, texts):
    t0 = time.perf_counter()
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    dt = time.perf_counter() - t0
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    return f"encode {mb:.2f} MB -> {n_tokens} tokens ({1e6 * mb / max(n_tokens, 1):.2f} bytes/token) " \
           f"in {dt:.2f}s = {mb / max(dt, 1e-9):.1f} MB/s"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train, inspect and use the byte-level BPE tokenizer.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = TrainConfig()
    tr = sub.add_parser("train", help="train the embedded default's BPE on a corpus")
    tr.add_argument("--data", default=d.data, help="jsonl: text / prompt+completion / messages per line")
    tr.add_argument("--vocab-size", type=int, default=d.vocab_size, help="ids in all, specials included")
    tr.add_argument("--out", default=d.out, help="output directory")
    en = sub.add_parser("encode", help="show the ids of a text, or the encode throughput on a file")
    en.add_argument("--tokenizer", required=True, help="tokenizer directory or file (any supported format)")
    en.add_argument("--file", help="encode this jsonl file instead of TEXT and report throughput")
    en.add_argument("text", nargs="?", default="")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            print(TrainConfig(args.data, args.vocab_size, args.out))
            texts = read_texts(args.data)
            t0 = time.perf_counter()
            tok = train_bpe(texts, args.vocab_size, verbose=True)
            mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
            print(f"trained {tok.vocab_size} ids on {mb:.2f} MB in {time.perf_counter() - t0:.1f}s")
            print(_throughput(tok, texts))
            tok.save(args.out)
            print(f"saved {Path(args.out) / RANKS_FILE} and {Path(args.out) / CONFIG_FILE}")
        else:
            t0 = time.perf_counter()
            tok = Tokenizer.load(args.tokenizer)
            print(f"{tok!r} loaded in {time.perf_counter() - t0:.2f}s")
            if args.file:
                print(_throughput(tok, read_texts(args.file)))
            else:
                ids = tok.encode(args.text)
                print(ids)
                print(" | ".join(repr(tok.decode([i]))[1:-1] for i in ids))
                print(f"{len(ids)} tokens; " + _throughput(tok, [args.text]))
    except (TokenizerError, OSError) as e:  # OSError: a missing or unreadable --data / --file
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
