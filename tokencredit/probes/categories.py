"""Token categories (cancellation paper Fig. 4): Math, Template/format, Reasoning.

What it does
    Fig. 4 compares where the *boosted mass* of an update goes (sum of
    positive Δ log p over tokens of a category, divided by the sum over all
    tokens) under the GRPO update vs. the positive-only update (A^+, the
    polarity probe, Alg. 2): positive-only updates reinforce template and
    formatting tokens; GRPO shifts mass to reasoning tokens.

    `categorize_token(piece)` classifies one decoded string by the rules below;
    `categorize_pieces(pieces)` classifies a response's tokens with context
    (word spans, `$...$` math mode, variables next to operators);
    `category_mass(records, tokenizer)` sums Δ log p per category for one or
    several sets of per-token flip records.

Rules (applied to a decoded piece or, in context, to the *unit* (word,
number, LaTeX command, markup tag, single symbol) that the token belongs to;
first match wins)
    format     empty / whitespace only; chat and special markup (<|im_start|>,
               <|im_end|>, <|endoftext|>, <s>, </s>, <pad>, <think> ...);
               \\boxed / \\fbox; markdown (#, ##, **, __, ```, ---, >);
               punctuation . , ; : ? ! ' " ` and unicode quotes/dashes/ellipsis;
               template words: answer, final, finally, step, steps, solution,
               question, problem, box, boxed, assistant, user, system, think,
               response (case-insensitive)
    math       anything with a digit; LaTeX commands (\\frac, \\sqrt, \\cdot,
               \\times, \\pi, \\left ...) and math delimiters ($, \\(, \\), \\[, \\]);
               operators and grouping + - * / = < > ^ _ | ( ) [ ] { } % and
               unicode math symbols (× ÷ ± ≤ ≥ ≠ ≈ √ π ∑ ∫ · ∞ ...);
               a single letter other than a / A / I (a variable: x, n, b);
               in context also: every word inside $...$, \\( \\), \\[ \\], and a
               one-letter word a / A / I right next to a math unit ("2a", "a + b")
    reasoning  every other piece with a letter (words, word pieces)
    Pieces that are none of these (e.g. a lone byte-fallback '�') are format.

Simplifications
    Rules, not a tagger: NLTK's POS tagger needs data files that are not
    installable from a package registry on our offline machines, and the
    paper's three categories are mostly lexical anyway. A BPE piece that is
    part of a longer word ("ation") is a reasoning token unless the word is a
    template word. `\\boxed` is template even though it sits in LaTeX.

Try it
    from tokencredit.probes.categories import categorize_token, category_mass
    categorize_token(" answer"), categorize_token("\\\\frac"), categorize_token(" because")
    category_mass({"grpo": grpo_records, "positive_only": pos_records}, tokenizer)
    # -> {"grpo": {"math": .., "format": .., "reasoning": .., ...}, "positive_only": {...}, "shift": {...}}
    table, _ = polarity_probe(model, batch)      # tokencredit.probes.polarity (Alg. 2)
    category_mass(table, tokenizer)              # the same, from its delta_grpo / delta_positive_only
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CATEGORIES = ("math", "format", "reasoning")

FORMAT_WORDS = frozenset(
    "answer answers final finally step steps solution question problem box boxed assistant user system think response".split()
)
SPECIAL_RE = re.compile(r"^(<\|[^|>]*\|>|</?s>|<pad>|<unk>|<eos>|<bos>|</?think>|<\|?endoftext\|?>|\[/?INST\])$", re.I)
MATH_SYMBOLS = set("+-*/=<>^_|()[]{}%") | set("×÷±∓≤≥≠≈≡∼√∛π∑∏∫∂∞∝∈∉⊂⊆∪∩∀∃·⋅°′″→⇒⇔←↔∠⊥∥△αβγδεθλμσφωΔΣΩ")
MATH_DELIMS = {"$", "$$", "\\(", "\\)", "\\[", "\\]"}
FORMAT_LATEX = {"\\boxed", "\\fbox", "\\box"}
MARKDOWN = {"#", "##", "###", "####", "**", "__", "```", "---", "***", ">", "`", "``"}
PUNCT = (set(string.punctuation) - MATH_SYMBOLS) | set("“”‘’–—…«»")  # . , ; : ? ! ' " ` \ @ & ~ #
SHORT_WORDS = {"a", "A", "I"}

# one unit per match: markup tag | LaTeX command | LaTeX delimiter | number | word | whitespace | any other char
UNIT_RE = re.compile(
    r"<\|[^|>\s]*\|>|</?[A-Za-z]+>|\\[A-Za-z]+|\\[()\[\]]|\$\$|\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)?|\*\*|```|---|#{1,4}|\s+|.",
    re.S,
)


def categorize_token(text_piece: str) -> str:
    """"math" | "format" | "reasoning" for one decoded token string, context-free
    (rules in the module docstring). Leading/trailing whitespace is ignored
    unless the piece is only whitespace (then "format")."""
    p = text_piece.strip()
    if not p:
        return "format"
    if SPECIAL_RE.match(p):
        return "format"
    low = p.lower()
    if low.lstrip("\\") in ("boxed", "fbox") or p in FORMAT_LATEX:
        return "format"
    if p in MARKDOWN:
        return "format"
    if any(c.isdigit() for c in p):
        return "math"
    if p in MATH_DELIMS or re.fullmatch(r"\\[A-Za-z]+\*?", p):
        return "math"
    if all(c in MATH_SYMBOLS for c in p):
        return "math"
    if re.fullmatch(r"[^\W\d_]+(?:'[^\W\d_]+)?", p):  # letters only
        if low in FORMAT_WORDS:
            return "format"
        if len(p) == 1 and p not in SHORT_WORDS and p.isascii():
            return "math"  # a variable
        return "reasoning"
    if all(c in PUNCT for c in p):
        return "format"
    # mixed pieces such as "(x", "x^", ".\n": math if they carry a math symbol, else by their letters
    if any(c in MATH_SYMBOLS for c in p):
        return "math"
    if any(c.isalpha() for c in p):
        letters = "".join(c for c in p if c.isalpha())
        return "format" if letters.lower() in FORMAT_WORDS else "reasoning"
    return "format"


def categorize_pieces(pieces: Sequence[str]) -> list[str]:
    """Categories of a response's tokens in order, using context.

    The decoded pieces (n,) are joined; the text is cut into units (UNIT_RE);
    each unit gets categorize_token's category, overridden to "math" inside
    $...$ / \\( \\) / \\[ \\] and for a / A / I next to a math unit; each token gets
    the category of the first non-whitespace unit it overlaps (a whitespace-only
    token is "format"). Returns (n,) category strings.
    """
    text = "".join(pieces)
    units = [(m.start(), m.end(), m.group()) for m in UNIT_RE.finditer(text)]
    cats = [categorize_token(u) for _, _, u in units]
    # math mode
    in_math = False
    for i, (_, _, u) in enumerate(units):
        if u in ("$", "$$"):
            in_math = not in_math
            continue
        if u in ("\\(", "\\["):
            in_math = True
            continue
        if u in ("\\)", "\\]"):
            in_math = False
            continue
        if in_math and cats[i] == "reasoning":
            cats[i] = "math"
    # a / A / I as variables next to a math unit (skipping whitespace)
    solid = [i for i, (_, _, u) in enumerate(units) if u.strip()]
    for j, i in enumerate(solid):
        if units[i][2] in SHORT_WORDS:
            nb = [solid[j - 1]] if j > 0 else []
            nb += [solid[j + 1]] if j + 1 < len(solid) else []
            if any(cats[k] == "math" and units[k][2] not in MATH_DELIMS for k in nb):
                cats[i] = "math"
    # map units back to tokens
    out, pos, ui = [], 0, 0
    for piece in pieces:
        start, end = pos, pos + len(piece)
        pos = end
        if not piece.strip():
            out.append("format")
            continue
        while ui < len(units) and units[ui][1] <= start:
            ui += 1
        cat = None
        k = ui
        while k < len(units) and units[k][0] < end:
            if units[k][2].strip():
                cat = cats[k]
                break
            k += 1
        out.append(cat or categorize_token(piece))
    return out


# ----------------------------------------------------------------------------
# boosted mass per category
# ----------------------------------------------------------------------------


def _columns(records: Any) -> dict[str, list]:
    """Flip records as columns: a dict of lists, a list of dicts, a pyarrow
    Table or a path to a parquet / jsonl file."""
    if isinstance(records, (str, Path)):
        p = Path(records)
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pydict()
        rows = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
        return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
    if hasattr(records, "to_pydict"):
        return records.to_pydict()
    if isinstance(records, Mapping):
        return {k: list(v) for k, v in records.items()}
    rows = list(records)
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}


def _is_record_set(x: Any) -> bool:
    if isinstance(x, (str, Path)) or hasattr(x, "to_pydict"):
        return True
    if isinstance(x, Mapping):
        return "token_id" in x
    return True


def token_categories(cols: dict[str, list], tokenizer) -> list[str]:
    """Category of every record [N], decided with each row's context: tokens
    of a row (same "row" and, if present, "policy_version") are ordered by "position",
    decoded one by one and passed to `categorize_pieces`."""
    n = len(cols["token_id"])
    rows = cols.get("row", [0] * n)
    steps = cols.get("policy_version", [0] * n)
    pos = cols.get("position", list(range(n)))
    by_row: dict[tuple, list[int]] = {}
    for i in range(n):
        by_row.setdefault((steps[i], rows[i]), []).append(i)
    cache: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in cache:
            cache[t] = tokenizer.decode([int(t)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return cache[t]

    out = [""] * n
    for idx in by_row.values():
        idx.sort(key=lambda i: pos[i])
        for i, c in zip(idx, categorize_pieces([piece(cols["token_id"][i]) for i in idx])):
            out[i] = c
    return out


def category_mass(records: Any, tokenizer, weight: str = "boosted", eps: float = 1e-6) -> dict[str, Any]:
    """Share of update mass per token category (Fig. 4).

    records: one of
      * a set of per-token flip records (columns step, row, position, token_id,
        delta; a dict of lists, list of dicts, pyarrow Table or path);
      * the polarity probe's table (`tokencredit.probes.polarity.polarity_probe`):
        no "delta" but delta_grpo and delta_positive_only columns; every
        delta_<name> column is one set, named <name>;
      * a mapping {name: record set}, e.g. {"grpo": ..., "positive_only": ...}.
    weight: "boosted" (mass = sum of max(delta, 0), the paper's boosted mass),
      "suppressed" (sum of max(-delta, 0)), "abs" (sum of |delta|) or
      "count" (number of tokens with delta > eps).
    Returns for one set {"math", "format", "reasoning": share in [0, 1] (sum 1,
    or 0 if no mass), "mass": {cat: float}, "tokens": {cat: int}, "total",
    "weight"}; for several sets {name: that dict, ..., "shift": {cat: share of
    the first set - share of the second}} (the shift only for two sets).
    """
    if weight not in ("boosted", "suppressed", "abs", "count"):
        raise ValueError(f"weight must be boosted|suppressed|abs|count, got {weight!r}")
    if isinstance(records, Mapping) and not _is_record_set(records):
        return _with_shift({name: category_mass(r, tokenizer, weight, eps) for name, r in records.items()})
    cols = _columns(records)
    if not cols or not cols.get("token_id"):
        return _mass([], [], weight, eps)
    cats = token_categories(cols, tokenizer)
    if "delta" in cols:
        return _mass(cats, cols["delta"], weight, eps)
    sets = [k for k in cols if k.startswith("delta_")]
    if not sets:
        raise ValueError(f"records need a 'delta' or 'delta_<name>' column; got {sorted(cols)}")
    return _with_shift({k[len("delta_"):]: _mass(cats, cols[k], weight, eps) for k in sets})


def _with_shift(out: dict[str, Any]) -> dict[str, Any]:
    names = list(out)
    if len(names) == 2:
        a, b = out[names[0]], out[names[1]]
        out["shift"] = {c: a[c] - b[c] for c in CATEGORIES}
    return out


def _mass(cats: Sequence[str], deltas: Sequence[float], weight: str, eps: float) -> dict[str, Any]:
    """Shares, masses and token counts per category for [N] categories and [N] deltas."""
    mass = {c: 0.0 for c in CATEGORIES}
    count = {c: 0 for c in CATEGORIES}
    for c, d in zip(cats, deltas):
        d = float(d)
        count[c] += 1
        if weight == "boosted":
            mass[c] += max(d, 0.0)
        elif weight == "suppressed":
            mass[c] += max(-d, 0.0)
        elif weight == "abs":
            mass[c] += abs(d)
        else:
            mass[c] += float(d > eps)
    total = sum(mass.values())
    shares = {c: (mass[c] / total if total > 0 else 0.0) for c in CATEGORIES}
    return {**shares, "mass": mass, "tokens": count, "total": total, "weight": weight}


def write_category_json(path: str | Path, result: Mapping[str, Any]) -> Path:
    """Write category_mass output (a mapping of sets) where `tokencredit report`
    finds it: RUN_DIR/probes/categories*.json."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2))
    return p
