"""Annotations of `digit_scenes` derived from a layout: captions, question-answer pairs, soft
(detector-like) class distributions for the digit boxes, and noisy region proposals.

All functions are deterministic given their `numpy.random.Generator`. Vocabularies are module
constants: `REGION_CLASSES` (the 10 digits + background, the classes of every soft distribution),
`QUESTION_TYPES` and `ANSWER_VOCAB` (answers are stored both as strings and as ids into it).
"""
from __future__ import annotations

import numpy as np

from colearn_jax.data.scene_render import COLOUR_NAMES, SIZE_NAMES, Layout, iou

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = tuple(w + ("es" if w.endswith("x") else "s") for w in CLASS_NAMES)  # sixes, sevens
COUNT_WORDS = CLASS_NAMES  # counts are answered in words: zero .. nine
REGION_CLASSES = CLASS_NAMES + ("background",)
BACKGROUND = len(CLASS_NAMES)

# Look-alike digits: where a detector's class distribution puts its doubt.
LOOKALIKES = {0: (6, 8), 1: (7, 4), 2: (7, 3), 3: (5, 8), 4: (9, 1), 5: (3, 6), 6: (0, 5),
              7: (1, 2), 8: (3, 5), 9: (4, 7)}

QUESTION_TYPES = ("colour", "count", "size", "position", "relation", "digit")
ANSWER_VOCAB = (("no", "yes") + CLASS_NAMES + COLOUR_NAMES + SIZE_NAMES
                + ("left", "right", "top", "bottom"))
ANSWER_IDS = {a: i for i, a in enumerate(ANSWER_VOCAB)}

MARGIN = 0.12  # Positions/relations are only asked or stated when this clear (canvas fractions).
# Relations asked about, as (axis, sign): "i REL j" when sign * (centre_i - centre_j) > MARGIN.
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
             "below": (1, 1)}


# ------------------------------------------------------------------ words

# Every word and punctuation mark the captions, questions and answers below can contain (the
# "digit_scenes" vocabulary of `tokenizers.WordTokenizer`; tests/test_digit_scenes.py checks it
# covers generated scenes).
CAPTION_VOCAB = tuple(dict.fromkeys(
    CLASS_NAMES + PLURALS + COLOUR_NAMES + SIZE_NAMES + tuple("0123456789")
    + ("digit", "digits", "a", "the", "and", "is", "are", "there", "in", "written", "to", "of", "left",
       "right", "above", "below", "at", "top", "bottom", "on", "middle", "how", "many", "what", "colour",
       "number", "or", "yes", "no", ":", ",", "?")))


def _describe(layout: Layout, i: int, attrs=("size", "colour", "digit"), article="a") -> str:
    words = []
    if "size" in attrs:
        words.append(SIZE_NAMES[layout.sizes[i]])
    if "colour" in attrs:
        words.append(COLOUR_NAMES[layout.colours[i]])
    words.append(CLASS_NAMES[layout.digits[i]] if "digit" in attrs else "digit")
    return f"{article} {' '.join(words)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(cx: float, cy: float) -> str:
    h = "left" if cx < 0.5 - MARGIN else "right" if cx > 0.5 + MARGIN else ""
    v = "top" if cy < 0.5 - MARGIN else "bottom" if cy > 0.5 + MARGIN else ""
    if h and v:
        return f"at the {v} {h}"
    if h:
        return f"on the {h}"
    return f"at the {v}" if v else "in the middle"


def _relation(c: np.ndarray, i: int, j: int) -> str | None:
    """How digit i stands to digit j along the dominant axis, if clear."""
    dx, dy = c[i] - c[j]
    if max(abs(dx), abs(dy)) < MARGIN:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# ------------------------------------------------------------------ captions

def captions(rng: np.random.Generator, layout: Layout, image_size: int, count: int) -> list[str]:
    """`count` captions; the first lists every digit left to right ("two digits: a small red
    seven and a large blue two"), the rest are drawn from relation, position, numeral,
    attribute-binding and colour-count phrasings."""
    n = len(layout)
    c = layout.centres(image_size)
    full = [_describe(layout, i) for i in range(n)]
    first = f"{COUNT_WORDS[n]} digit{'s' if n > 1 else ''}: {_join(full)}"
    pool = [
        _join([full[i] for i in rng.permutation(n)]),
        _join([f"{full[i]} {_where(*c[i])}" for i in range(n)]),
        _join([f"a {COLOUR_NAMES[layout.colours[i]]} {layout.digits[i]}" for i in range(n)]),
        _join([f"the {CLASS_NAMES[layout.digits[i]]} is {COLOUR_NAMES[layout.colours[i]]}"
               for i in range(n)]),
    ]
    if n == 1:
        pool += [f"a {CLASS_NAMES[layout.digits[0]]} written in {COLOUR_NAMES[layout.colours[0]]}",
                 f"a {SIZE_NAMES[layout.sizes[0]]} digit {layout.digits[0]} in "
                 f"{COLOUR_NAMES[layout.colours[0]]}"]
    else:
        for i in range(n):
            for j in range(n):
                rel = _relation(c, i, j) if i != j else None
                if rel:
                    pool.append(f"{full[i]} {rel} {full[j]}")
        colours, counts = np.unique(layout.colours, return_counts=True)
        pool.append(_join([f"{COUNT_WORDS[k]} {COLOUR_NAMES[col]} digit{'s' if k > 1 else ''}"
                           for col, k in zip(colours, counts)]))
    pool = list(dict.fromkeys(p for p in pool if p != first))
    picks = rng.choice(len(pool), size=count - 1, replace=len(pool) < count - 1)
    return [first] + [pool[k] for k in picks]


# ------------------------------------------------------------------ questions

def _refer(layout: Layout, i: int, exclude: str = "") -> str | None:
    """Shortest description that picks out digit i alone without naming `exclude`."""
    options = [("digit",), ("colour",), ("size", "digit"), ("colour", "digit"), ("size", "colour"),
               ("size", "colour", "digit")]
    keys = {"digit": layout.digits, "colour": layout.colours, "size": layout.sizes}
    for attrs in options:
        if exclude in attrs:
            continue
        match = np.ones(len(layout), bool)
        for a in attrs:
            match &= keys[a] == keys[a][i]
        if match.sum() == 1:
            if attrs == ("digit",):
                return f"the {CLASS_NAMES[layout.digits[i]]}"
            return _describe(layout, i, attrs, "the")
    return None


def _candidates(rng, layout: Layout, image_size: int) -> dict[str, list[tuple[str, str]]]:
    n = len(layout)
    c = layout.centres(image_size)
    q: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    q["count"].append(("how many digits are there?", COUNT_WORDS[n]))
    present = sorted(set(layout.colours.tolist()))
    absent = [k for k in range(len(COLOUR_NAMES)) if k not in present]
    for col in present + ([absent[int(rng.integers(len(absent)))]] if absent else []):
        q["count"].append((f"how many {COLOUR_NAMES[col]} digits are there?",
                           COUNT_WORDS[int((layout.colours == col).sum())]))
    for d in sorted(set(layout.digits.tolist())) + [int(rng.integers(10))]:
        q["count"].append((f"how many {PLURALS[d]} are there?",
                           COUNT_WORDS[int((layout.digits == d).sum())]))
    for i in range(n):
        if ref := _refer(layout, i, "colour"):
            q["colour"].append((f"what colour is {ref}?", COLOUR_NAMES[layout.colours[i]]))
        if ref := _refer(layout, i, "size"):
            q["size"].append((f"is {ref} small or large?", SIZE_NAMES[layout.sizes[i]]))
        if ref := _refer(layout, i, "digit"):
            q["digit"].append((f"what number is {ref}?", CLASS_NAMES[layout.digits[i]]))
        ref = _refer(layout, i)
        if ref and abs(c[i, 0] - 0.5) > MARGIN:
            q["position"].append((f"is {ref} on the left or on the right?",
                                  "left" if c[i, 0] < 0.5 else "right"))
        if ref and abs(c[i, 1] - 0.5) > MARGIN:
            q["position"].append((f"is {ref} at the top or at the bottom?",
                                  "top" if c[i, 1] < 0.5 else "bottom"))
    for j in range(n):
        rj = _refer(layout, j)
        if not rj:
            continue
        for rel, (axis, sign) in RELATIONS.items():
            delta = sign * (c[:, axis] - c[j, axis])
            side = np.sign(delta) * (np.abs(delta) > MARGIN)  # +1 holds, -1 clearly not, 0 unclear
            others = [k for k in range(n) if k != j]
            for i in others:
                ri = _refer(layout, i)
                if ri and side[i] != 0 and rng.random() < 0.5:
                    q["relation"].append((f"is {ri} {rel} {rj}?", "yes" if side[i] > 0 else "no"))
            hits = [k for k in others if side[k] > 0]
            if len(hits) == 1 and all(side[k] < 0 for k in others if k != hits[0]):
                q["relation"].append((f"what number is {rel} {rj}?",
                                      CLASS_NAMES[layout.digits[hits[0]]]))
    return q


def questions(rng: np.random.Generator, layout: Layout, image_size: int, count: int):
    """Up to `count` (question, answer, type id) triples, types taken round-robin in a random
    order so that every type that has a well-posed question appears."""
    groups = _candidates(rng, layout, image_size)
    for g in groups.values():
        order = rng.permutation(len(g))
        g[:] = [g[k] for k in order]
    out, seen = [], set()
    types = [QUESTION_TYPES.index(t) for t in rng.permutation(QUESTION_TYPES)]
    while len(out) < count and any(groups[QUESTION_TYPES[t]] for t in types):
        for t in types:
            g = groups[QUESTION_TYPES[t]]
            while g and len(out) < count:
                question, answer = g.pop(0)
                if question not in seen:
                    seen.add(question)
                    out.append((question, answer, t))
                    break
    return out


# ------------------------------------------------------------------ regions

def box_soft_labels(rng: np.random.Generator, layout: Layout, occlusion: np.ndarray) -> np.ndarray:
    """[n, 11] detector-like class distributions for the true digit boxes: most mass on the digit
    (less when occluded, never under 0.51, so it stays the argmax), most of the rest on its
    look-alikes, a little on anything."""
    out = np.zeros((len(layout), len(REGION_CLASSES)))
    for i, d in enumerate(layout.digits):
        conf = max(0.51, rng.uniform(0.6, 0.92) * (1.0 - 0.5 * float(occlusion[i])))
        rest = 1.0 - conf
        out[i] = 0.2 * rest * rng.dirichlet(np.ones(len(REGION_CLASSES)))
        out[i, list(LOOKALIKES[int(d)])] += 0.8 * rest * rng.dirichlet([2.0, 1.0])
        out[i, d] += conf
    return (out / out.sum(-1, keepdims=True)).astype(np.float32)


def proposals(rng: np.random.Generator, layout: Layout, box_soft: np.ndarray, image_size: int,
              count: int):
    """Region proposals as a detector would give: two jittered copies of every true box plus a
    random number of random boxes, sorted by objectness, padded to `count`.

    Returns (boxes [count, 4] normalised, soft labels [count, 11], mask [count], IoU with the best
    true box [count], index of that box when IoU >= 0.5 else -1 [count]).
    """
    n, s = len(layout), float(image_size)
    truth = layout.boxes.astype(np.float64) / s
    boxes = []
    for b in truth:
        for _ in range(2):
            w, h = b[2] - b[0], b[3] - b[1]
            cx = (b[0] + b[2]) / 2 + rng.normal(0, 0.08) * w
            cy = (b[1] + b[3]) / 2 + rng.normal(0, 0.08) * h
            w, h = w * np.exp(rng.normal(0, 0.12)), h * np.exp(rng.normal(0, 0.12))
            boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    for _ in range(int(rng.integers(1, count - 2 * n + 1))):
        w, h = rng.uniform(0.15, 0.5, size=2)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        boxes.append((x, y, x + w, y + h))
    boxes = np.clip(np.asarray(boxes), 0.0, 1.0)
    overlaps = iou(boxes, truth)
    best, best_iou = overlaps.argmax(1), overlaps.max(1)
    weight = np.clip((best_iou - 0.1) / 0.6, 0.0, 1.0)[:, None]
    noise = 0.15 * rng.dirichlet(np.ones(len(REGION_CLASSES)), size=len(boxes))
    background = np.zeros((len(boxes), len(REGION_CLASSES)))
    background[:, BACKGROUND] = 0.85
    soft = weight * box_soft[best] + (1 - weight) * (background + noise)
    soft /= soft.sum(-1, keepdims=True)
    order = np.argsort(-(1 - soft[:, BACKGROUND]), kind="stable")  # most object-like first
    k = len(boxes)
    out_boxes = np.zeros((count, 4), np.float32)
    out_soft = np.zeros((count, len(REGION_CLASSES)), np.float32)
    out_iou = np.zeros(count, np.float32)
    out_match = np.full(count, -1, np.int32)
    out_boxes[:k], out_soft[:k], out_iou[:k] = boxes[order], soft[order], best_iou[order]
    out_match[:k] = np.where(best_iou[order] >= 0.5, best[order], -1)
    return out_boxes, out_soft, np.arange(count) < k, out_iou, out_match
