"""Caption metrics - BLEU-1..4, ROUGE-L, CIDEr-D - computed as the MS-COCO caption evaluation does,
in plain Python/numpy (no java, no run-time dependency on `pycocoevalcap`), plus decoding of generated
token ids, the evaluator's metric specs, and the fraction of captions naming the right classes (on
`digit_scenes`: every digit in the image).

Metrics
-------
* BLEU (Papineni, Roukos, Ward & Zhu, "BLEU: a method for automatic evaluation of machine
  translation", ACL 2002): clipped n-gram precisions p_1..p_4 pooled over the whole corpus (counts
  summed over images before dividing), BLEU-n = (p_1 ... p_n)^(1/n) times a brevity penalty.
* ROUGE-L (Lin, "ROUGE: A package for automatic evaluation of summaries", ACL workshop 2004): the
  F-measure of the longest-common-subsequence precision and recall.
* CIDEr-D (Vedantam, Zitnick & Parikh, "CIDEr: Consensus-based image description evaluation", CVPR
  2015): cosine similarity of tf-idf weighted n-gram vectors (n = 1..4) against each reference,
  with the "-D" changes against gaming: candidate weights clipped at the reference's, a Gaussian
  penalty on the length difference, and a factor 10.

Conventions of coco-caption (github.com/tylin/coco-caption, packaged as `pycocoevalcap` 1.2), which
these functions reproduce to floating-point rounding (`tests/test_captioning_metrics.py` checks it):
* Inputs are `{image_id: [reference strings]}` and `{image_id: [one candidate string]}` with the same
  keys, already tokenised: lower-case words joined by spaces (coco-caption runs the PTB tokenizer
  first and drops punctuation tokens; `tokenize` below is our java-free stand-in).
* BLEU: words are `str.split()`. Each image's effective reference length is the reference length
  closest to the candidate's (the shorter one on a tie); r and c are summed over the corpus and the
  brevity penalty is exp(1 - r/c) when c < r, computed as exp(1 - 1/ratio) with
  ratio = (c + 1e-15) / (r + 1e-9). Every precision is (matches + 1e-15) / (guesses + 1e-9), so a
  zero match count gives a tiny positive BLEU rather than 0. Per-image BLEU uses the same formulae on
  that image's counts alone. (The `Bleu` scorer always uses "closest", also for one image.)
* ROUGE-L: words are `str.split(" ")` (an empty string is one empty word). Precision and recall are
  each maximised over the references separately (LCS / candidate length, LCS / reference length),
  then F = (1 + beta^2) P R / (R + beta^2 P) with beta = 1.2, 0 when P or R is 0; the corpus score is
  the mean over images.
* CIDEr-D: n-gram counts of `str.split()` words. Document frequency df(g) = number of images of the
  evaluated set with g in at least one of their references; idf(g) = log(N_images) - log(max(1, df)).
  A sentence's vector for each n holds tf * idf; per reference, sum over the candidate's n-grams of
  min(w_cand, w_ref) * w_ref divided by |w_cand| |w_ref| (left undivided when a norm is 0), times
  exp(-delta^2 / (2 sigma^2)), sigma = 6, where delta is the difference of the two sentences'
  lengths in words. (coco-caption counts a sentence's bigrams as its "length", max(0, words - 1):
  the difference is the same unless a sentence is empty, and then the similarity is 0 anyway.)
  Image score =
  10 * mean over n of (sum over references) / number of references; corpus score = mean over images.
  `pycocoevalcap.cider.Cider` in 1.2 is this CIDEr-D (clipping and length penalty included); the
  x10 scale is coco-caption's, papers usually print 100x it.

Our captions
------------
`tokenize(text)`: lower-case; apostrophes removed ("digit's" -> "digits"); every other character that
is not a letter or digit is a word boundary; words joined by single spaces. Unlike PTB it does not
split contractions, so scores are comparable across our runs but not exactly to published COCO
numbers; on the digit_scenes captions (lower-case words, ":" and ",") it gives PTB's words.

`caption_metrics(captions, references)` tokenises raw strings and returns every metric;
`evaluate_generated(token_ids, references, tokenizer)` first decodes generated ids (cut at the first
EOT after an optional leading SOT). `caption_metric_specs()` is the `{name: MetricSpec}` a system's
`describe_metrics` returns.

Classes named
-------------
`classes_named_correctly(captions, references, class_names)` is the one "names every digit in the
image correctly" criterion (the CoCa evaluator's `caption_digits_correct`, `caption_metrics`'
`digits_correct` and the notebook use it): a caption is correct when the class names it mentions
(`named_classes`: words of `class_names`, after a "...:" count prefix such as "two digits:", which
is not a digit) equal the reference's as a multiset - each class as many times as the reference
names it, in any order, nothing missing and nothing extra.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Mapping, Sequence

import numpy as np

from colearn_jax.evals import MetricSpec

__all__ = [
    "tokenize", "bleu", "rouge_l", "cider_d", "corpus_scores", "caption_metrics",
    "decode_generated", "evaluate_generated", "caption_metric_specs", "named_classes",
    "classes_named_correctly", "BLEU_NAMES", "METRIC_NAMES", "DIGITS_CORRECT",
]

BLEU_NAMES = ("bleu1", "bleu2", "bleu3", "bleu4")
METRIC_NAMES = BLEU_NAMES + ("rouge_l", "cider_d")
DIGITS_CORRECT = "digits_correct"  # with the "caption_" prefix: the evaluator's name

_TINY = 1e-15   # coco-caption's BLEU: added to numerators (matches, candidate length)
_SMALL = 1e-9   # ... and to denominators (guesses, reference length)
_ROUGE_BETA = 1.2

Refs = Mapping[Hashable, Sequence[str]]
Cands = Mapping[Hashable, Sequence[str]]


# ------------------------------------------------------------------ tokenisation

_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[\W_]+")  # any run of non-letter, non-digit characters


def tokenize(text: str | bytes) -> str:
    """Lower-case, punctuation-free, single-space separated words of `text` (see module doc)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = _APOSTROPHES.sub("", str(text).lower())
    return " ".join(_NON_WORD.sub(" ", text).split())


# ------------------------------------------------------------------ helpers

def _check(refs: Refs, cands: Cands) -> list:
    if set(refs) != set(cands):
        missing, extra = set(refs) - set(cands), set(cands) - set(refs)
        raise ValueError(f"refs and candidates must have the same image ids; only in refs: "
                         f"{sorted(map(str, missing))[:5]}, only in candidates: "
                         f"{sorted(map(str, extra))[:5]}.")
    if not refs:
        raise ValueError("No images to score.")
    for key in refs:
        if isinstance(cands[key], (str, bytes)) or len(cands[key]) != 1:
            raise ValueError(f"image {key!r}: expected a list of exactly one candidate, got "
                             f"{cands[key]!r}.")
        if isinstance(refs[key], (str, bytes)) or len(refs[key]) < 1:
            raise ValueError(f"image {key!r}: expected a non-empty list of references.")
    return list(refs)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of every k-gram, k = 1..n, keyed by tuples of words."""
    out: Counter = Counter()
    for k in range(1, n + 1):
        out.update(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
    return out


# ------------------------------------------------------------------ BLEU

def bleu(refs: Refs, cands: Cands, n: int = 4) -> tuple[list[float], np.ndarray]:
    """Corpus BLEU-1..n (list) and per-image BLEU-1..n (array [n, num_images], image order of
    `refs`), as coco-caption's `Bleu(n)` computes them."""
    ids = _check(refs, cands)
    matches = np.zeros((len(ids), n))
    guesses = np.zeros((len(ids), n))
    cand_len = np.zeros(len(ids))
    ref_len = np.zeros(len(ids))
    for row, key in enumerate(ids):
        words = cands[key][0].split()
        c = len(words)
        # Clip each candidate n-gram count at its largest count in any one reference.
        ceiling: Counter = Counter()
        lengths = []
        for ref in refs[key]:
            ref_words = ref.split()
            lengths.append(len(ref_words))
            ceiling |= _ngrams(ref_words, n)  # Counter union keeps the maximum count
        for gram, count in _ngrams(words, n).items():
            matches[row, len(gram) - 1] += min(count, ceiling.get(gram, 0))
        guesses[row] = [max(0, c - k) for k in range(n)]
        cand_len[row] = c
        # Closest reference length; ties go to the shorter reference.
        ref_len[row] = min(lengths, key=lambda length: (abs(length - c), length))

    def score(m, g, c, r):
        precision = (m + _TINY) / (g + _SMALL)                    # [..., n]
        cumulative = np.cumprod(precision, axis=-1)
        out = cumulative ** (1.0 / np.arange(1, n + 1))
        ratio = (c + _TINY) / (r + _SMALL)
        with np.errstate(over="ignore", divide="ignore"):
            penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1.0)), 1.0)
        return out * np.expand_dims(penalty, -1)

    corpus = score(matches.sum(0), guesses.sum(0), cand_len.sum(), ref_len.sum())
    per_image = score(matches, guesses, cand_len, ref_len).T
    return [float(x) for x in corpus], per_image


# ------------------------------------------------------------------ ROUGE-L

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(refs: Refs, cands: Cands, beta: float = _ROUGE_BETA) -> tuple[float, np.ndarray]:
    """Mean ROUGE-L F (beta = 1.2) over images and the per-image scores, as coco-caption's
    `Rouge()` computes them."""
    ids = _check(refs, cands)
    scores = np.zeros(len(ids))
    for row, key in enumerate(ids):
        words = cands[key][0].split(" ")
        best_p = best_r = 0.0
        for ref in refs[key]:
            ref_words = ref.split(" ")
            lcs = _lcs_length(ref_words, words)
            best_p = max(best_p, lcs / len(words))
            best_r = max(best_r, lcs / len(ref_words))
        if best_p > 0 and best_r > 0:
            scores[row] = (1 + beta ** 2) * best_p * best_r / (best_r + beta ** 2 * best_p)
    return float(scores.mean()), scores


# ------------------------------------------------------------------ CIDEr-D

def cider_d(refs: Refs, cands: Cands, n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """Mean CIDEr-D over images and the per-image scores, as coco-caption's `Cider()` (its
    CIDEr-D) computes them; document frequencies come from the references of this set."""
    ids = _check(refs, cands)
    ref_counts = {key: [_ngrams(r.split(), n) for r in refs[key]] for key in ids}
    doc_freq: Counter = Counter()
    for key in ids:
        doc_freq.update(set().union(*ref_counts[key]))
    log_images = math.log(len(ids))

    def weights(counts: Counter):
        """Per n: {gram: tf * idf}, and the vectors' norms."""
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq.get(gram, 0))))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    scores = np.zeros(len(ids))
    for row, key in enumerate(ids):
        words = cands[key][0].split()
        vec, norms = weights(_ngrams(words, n))
        total = np.zeros(n)
        for ref, counts in zip(refs[key], ref_counts[key]):
            ref_vec, ref_norms = weights(counts)
            penalty = math.exp(-((len(words) - len(ref.split())) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0)
                          for g, w in vec[k].items())
                if norms[k] != 0 and ref_norms[k] != 0:
                    dot /= norms[k] * ref_norms[k]
                total[k] += dot * penalty
        scores[row] = 10.0 * total.mean() / len(refs[key])
    return float(scores.mean()), scores


# ------------------------------------------------------------------ all together

def corpus_scores(refs: Refs, cands: Cands) -> dict[str, float]:
    """{bleu1..bleu4, rouge_l, cider_d} of tokenised `refs` / `cands` (coco-caption's inputs)."""
    bleus, _ = bleu(refs, cands, 4)
    out = dict(zip(BLEU_NAMES, bleus))
    out["rouge_l"] = rouge_l(refs, cands)[0]
    out["cider_d"] = cider_d(refs, cands)[0]
    return out


def _as_text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def caption_metrics(captions: Sequence[str], references: Sequence[Sequence[str]],
                    class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics of raw `captions[i]` against raw `references[i]` (a list of strings; bytes and ""
    padding, as in TFDS string features, are accepted - empty references are dropped). Both sides
    go through `tokenize`. With `class_names`, also `digits_correct`: the fraction of captions naming
    the classes of the image's first reference (`classes_named_correctly`)."""
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists.")
    refs, cands, firsts = {}, {}, []
    for i, (caption, image_refs) in enumerate(zip(captions, references)):
        if isinstance(image_refs, (str, bytes)):
            image_refs = [image_refs]
        raw = [r for r in (_as_text(r) for r in image_refs) if r.strip()]
        if not raw:
            raise ValueError(f"image {i} has no non-empty reference caption.")
        refs[i] = [tokenize(r) for r in raw]
        cands[i] = [tokenize(caption)]
        firsts.append(raw[0])
    out = corpus_scores(refs, cands)
    if class_names is not None:
        out[DIGITS_CORRECT] = float(np.mean(classes_named_correctly(captions, firsts, class_names)))
    return out


def decode_generated(token_ids, tokenizer) -> list[str]:
    """Texts of generated id rows `[N, L]`: a leading SOT is skipped and each row is cut at its
    first EOT (ids after it are whatever the decoder emitted once done), then
    `tokenizer.decode` drops pad ids. Works with `ByteTokenizer` and `ClipBpeTokenizer`."""
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be [N, L], got shape {ids.shape}.")
    texts = []
    for row in ids:
        row = row[1:] if len(row) and row[0] == tokenizer.sot_id else row
        ends = np.flatnonzero(row == tokenizer.eot_id)
        texts.append(tokenizer.decode(row[: ends[0]] if len(ends) else row))
    return texts


def evaluate_generated(token_ids, references: Sequence[Sequence[str]], tokenizer,
                       class_names: Sequence[str] | None = None) -> dict[str, float]:
    """A captioning evaluator's core: decode generated ids `[N, L]` with `tokenizer` and score them
    against `references[i]` (raw strings). Returns {bleu1..4, rouge_l, cider_d[, digits_correct]}."""
    return caption_metrics(decode_generated(token_ids, tokenizer), references, class_names)


def caption_metric_specs(digits: bool = False, prefix: str = "") -> dict[str, MetricSpec]:
    """`{name: MetricSpec}` of `caption_metrics` / `evaluate_generated` (names get `prefix`), for a
    system's `describe_metrics`. BLEU and ROUGE-L are fractions in [0, 1]; CIDEr-D is on
    coco-caption's scale (0..10; papers print 100x)."""
    specs = [MetricSpec(f"bleu{k}", description=f"corpus BLEU-{k} (coco-caption: closest ref length)")
             for k in range(1, 5)]
    specs.append(MetricSpec("rouge_l", description="ROUGE-L F (beta 1.2), mean over images"))
    specs.append(MetricSpec("cider_d", unit="CIDEr-D",
                            description="CIDEr-D (coco-caption scale, x100 in papers)"))
    if digits:
        specs.append(MetricSpec(DIGITS_CORRECT, description="captions naming the reference's digits (classes) as a "
                                "multiset, order free; a 'two digits:' count prefix is skipped"))
    return {prefix + s.name: MetricSpec(prefix + s.name, s.unit, s.higher_is_better, s.description)
            for s in specs}


# ------------------------------------------------------------------ classes named

def _class_words(class_names: Sequence[str]) -> dict[tuple[str, ...], str]:
    """{tokenised words of a class name: the name}; multi-word names match as word sequences."""
    out = {}
    for name in class_names:
        words = tuple(tokenize(name).split())
        if not words:
            raise ValueError(f"class name {name!r} has no words.")
        out.setdefault(words, str(name))
    return out


def named_classes(caption: str | bytes, class_names: Sequence[str]) -> list[str]:
    """The class names `caption` mentions, in order of mention, each time it mentions one: words
    (`tokenize`) equal to a class name, longest names first, after a "...:" prefix if there is one
    ("two digits: a red seven and a blue two" -> ["seven", "two"], not the count "two")."""
    text = _as_text(caption)
    if ":" in text:
        text = text.split(":", 1)[1]
    words = tokenize(text).split()
    names = _class_words(class_names)
    lengths = sorted({len(k) for k in names}, reverse=True)
    out, i = [], 0
    while i < len(words):
        for n in lengths:
            name = names.get(tuple(words[i:i + n]))
            if name is not None:
                out.append(name)
                i += n
                break
        else:
            i += 1
    return out


def classes_named_correctly(captions: Sequence[str | bytes], references: Sequence,
                            class_names: Sequence[str]) -> np.ndarray:
    """Bool per caption: does `captions[i]` name exactly the classes of `references[i]` - the same
    multiset of `named_classes` (order free; a missing, extra or wrong class makes it False)?
    `references[i]` is the reference caption (str/bytes), or the image's class indices into
    `class_names` (ints; negative entries are padding, as in digit_scenes' `box_digits`). The mean
    is the "names every digit in the image correctly" metric."""
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} references.")
    class_names = list(class_names)
    out = np.zeros(len(captions), bool)
    for i, (caption, ref) in enumerate(zip(captions, references)):
        if isinstance(ref, (str, bytes)):
            truth = Counter(named_classes(ref, class_names))
        else:
            truth = Counter(class_names[int(k)] for k in np.asarray(ref).reshape(-1) if int(k) >= 0)
        out[i] = Counter(named_classes(caption, class_names)) == truth
    return out
