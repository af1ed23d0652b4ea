"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D equal pycocoevalcap's scorers (the test
dependency; skipped only where it cannot be imported), decoding of generated ids, metric specs and
the classes-named criterion (every digit of a digit_scenes image named, order free)."""
from collections import Counter

import numpy as np
import pytest

from colearn_jax.data.scene_annotate import CLASS_NAMES
from colearn_jax.data.scene_annotate import captions as scene_captions
from colearn_jax.data.scene_render import COLOUR_NAMES, Layout
from colearn_jax.data.tokenizers import ByteTokenizer, get_tokenizer
from colearn_jax.evals import DescribedEvaluator
from colearn_jax.evals import captioning as C

TOL = 1e-6
VOCAB = "a the man dog red blue sits on grass two seven of and is".split()
DIGITS = list(CLASS_NAMES)


def _coco():
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    return bleu.Bleu, rouge.Rouge, cider.Cider


def _sentence(rng, lo, hi, vocab=VOCAB):
    return " ".join(rng.choice(vocab, size=int(rng.integers(lo, hi + 1))))


def _random_corpus(seed, num_images=25):
    rng = np.random.default_rng(seed)
    refs, cands = {}, {}
    for i in range(num_images):
        refs[i] = [_sentence(rng, 3, 12) for _ in range(int(rng.integers(1, 6)))]
        if rng.random() < 0.6:  # a perturbed reference: realistic partial n-gram overlap
            words = rng.choice(refs[i]).split()
            words = [w if rng.random() < 0.8 else str(rng.choice(VOCAB)) for w in words]
            cands[i] = [" ".join(words[: int(rng.integers(1, len(words) + 3))])]
        else:
            cands[i] = [_sentence(rng, 1, 14)]
    return refs, cands


def _edge_corpus():
    refs = {
        "short": ["a man sits on the red grass", "the man is on a blue grass"],  # cand shorter than all
        "disjoint": ["a dog on grass", "the red dog"],                           # no overlap at all
        "repeat": ["the dog sits", "a dog is on the grass"],                      # clipping of repeats
        "single": ["two seven of the blue"],                                      # one reference
        "exact": ["a red dog sits on the grass", "a dog"],
        "one_word": ["dog", "a red dog"],
        "closest": ["a b c", "a b c d e f g"],                                    # closest length 3
        "equidistant": ["x y", "x y z w v u"],                                    # 4 words: 2 and 6 tie
        7: ["numbers as ids too", "ids"],
    }
    cands = {
        "short": ["the man"],
        "disjoint": ["seven blue men"],
        "repeat": ["the the the dog dog dog"],
        "single": ["two seven of the blue"],
        "exact": ["a red dog sits on the grass"],
        "one_word": ["dog"],
        "closest": ["a b c d"],
        "equidistant": ["x y z w"],
        7: ["ids as numbers"],
    }
    return refs, cands


def _empty_corpus():
    """An empty candidate (a model that only emits EOT), an empty reference, and stray spaces
    (BLEU and CIDEr split on whitespace runs, ROUGE-L on single spaces)."""
    refs = {0: ["a dog on grass", "the dog"], 1: ["", "red man"], 2: ["the man sits"],
            3: ["a  dog sits ", "the dog"]}
    cands = {0: [""], 1: ["red man"], 2: ["man sits on"], 3: [" a dog  sits"]}
    return refs, cands


def _coco_scores(refs, cands):
    Bleu, Rouge, Cider = _coco()
    b, b_img = Bleu(4).compute_score(refs, cands, verbose=0)
    r, r_img = Rouge().compute_score(refs, cands)
    c, c_img = Cider().compute_score(refs, cands)
    return b, np.asarray(b_img), r, np.asarray(r_img), c, np.asarray(c_img)


def test_metrics_equal_pycocoevalcap():
    corpora = [_random_corpus(s) for s in range(6)]
    corpora += [_random_corpus(10 + s, num_images=3) for s in range(3)]
    corpora += [_edge_corpus(), _empty_corpus()]
    worst = Counter()
    for refs, cands in corpora:
        b, b_img, r, r_img, c, c_img = _coco_scores(refs, cands)
        ours_b, ours_b_img = C.bleu(refs, cands, 4)
        ours_r, ours_r_img = C.rouge_l(refs, cands)
        ours_c, ours_c_img = C.cider_d(refs, cands)
        diffs = {
            "bleu": np.max(np.abs(np.subtract(ours_b, b))),
            "bleu_img": np.max(np.abs(ours_b_img - b_img)),
            "rouge": abs(ours_r - r), "rouge_img": np.max(np.abs(ours_r_img - r_img)),
            "cider": abs(ours_c - c), "cider_img": np.max(np.abs(ours_c_img - c_img)),
        }
        for k, v in diffs.items():
            worst[k] = max(worst[k], float(v))
        assert ours_b_img.shape == (4, len(refs)) and ours_r_img.shape == ours_c_img.shape == (len(refs),)
        assert C.corpus_scores(refs, cands) == {**dict(zip(C.BLEU_NAMES, ours_b)),
                                                "rouge_l": ours_r, "cider_d": ours_c}
    print("max abs differences vs pycocoevalcap:", dict(worst))
    assert max(worst.values()) < TOL, dict(worst)
    # The corpora exercise non-trivial values (not all zeros / ones).
    refs, cands = _random_corpus(0)
    b, _, r, _, c, _ = _coco_scores(refs, cands)
    assert 0.2 < b[0] < 0.9 and 1e-3 < b[3] < b[0] and 0.1 < r < 0.9 and 0.05 < c < 5


def test_edge_case_values():
    refs, cands = _edge_corpus()
    keys = list(refs)
    b1, b_img = C.bleu(refs, cands, 4)
    _, r_img = C.rouge_l(refs, cands)
    _, c_img = C.cider_d(refs, cands)
    i = {k: n for n, k in enumerate(keys)}
    # Candidate shorter than every reference: brevity penalty exp(1 - r/c), r = closest length 7.
    assert b_img[0, i["short"]] == pytest.approx(np.exp(1 - 7 / 2), rel=1e-6)
    # No overlap: every score ~0 (BLEU keeps coco-caption's 1e-15 smoothing, so tiny but > 0).
    assert 0 < b_img[0, i["disjoint"]] < 1e-12 and r_img[i["disjoint"]] == 0 and c_img[i["disjoint"]] == 0
    # Repeated words are clipped: "the" x3 and "dog" x3 can match at most once each (max over refs).
    assert b_img[0, i["repeat"]] == pytest.approx(2 / 6, rel=1e-6)
    # Exact match with one reference: BLEU = ROUGE-L = 1 for that image (closest length = 7).
    assert b_img[:, i["exact"]] == pytest.approx(np.ones(4), rel=1e-6)
    assert r_img[i["exact"]] == pytest.approx(1.0)
    # Closest reference length, the shorter one on a tie: cand 4 words vs refs of 2 and 6 -> 2.
    assert b_img[0, i["equidistant"]] == pytest.approx(1.0)  # no brevity penalty
    assert C.bleu({0: ["x y z w v u", "x y"]}, {0: ["x y z w"]})[1][0, 0] == pytest.approx(1.0)
    # A single image: idf is 0 for every reference n-gram, so CIDEr-D is 0 by construction.
    assert C.cider_d({0: ["a dog"]}, {0: ["a dog"]})[0] == 0.0
    # Identical candidate and references over a corpus: CIDEr-D 10 (every cosine 1, no penalty).
    same = {k: [f"w{k} x{k} y{k} z{k}"] for k in range(4)}
    assert C.cider_d(same, same)[0] == pytest.approx(10.0)
    assert sum(b1) > 0


def test_input_validation():
    with pytest.raises(ValueError, match="same image ids"):
        C.bleu({0: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="exactly one candidate"):
        C.rouge_l({0: ["a"]}, {0: ["a", "b"]})
    with pytest.raises(ValueError, match="non-empty list"):
        C.cider_d({0: []}, {0: ["a"]})
    with pytest.raises(ValueError, match="no non-empty reference"):
        C.caption_metrics(["a dog"], [["", b""]])


def test_tokenize():
    assert C.tokenize("Two digits: a small RED seven, and a large blue 2.") == \
        "two digits a small red seven and a large blue 2"
    assert C.tokenize(b"  The dog's ball -- isn't it?! ") == "the dogs ball isnt it"
    assert C.tokenize("left-hand  side_by_side") == "left hand side by side"
    assert C.tokenize("...") == ""


def test_caption_metrics_tokenises_and_matches_pycocoevalcap():
    captions = ["Two digits: a small red SEVEN and a large blue two.", "a dog!", ""]
    references = [[b"two digits: a small red seven and a large blue two", b"a red 7 and a blue 2", b""],
                  ["A dog, on grass.", "the dog"], ["a man sits"]]
    out = C.caption_metrics(captions, references)
    assert set(out) == set(C.METRIC_NAMES)
    refs = {0: ["two digits a small red seven and a large blue two", "a red 7 and a blue 2"],
            1: ["a dog on grass", "the dog"], 2: ["a man sits"]}
    cands = {0: ["two digits a small red seven and a large blue two"], 1: ["a dog"], 2: [""]}
    b, _, r, _, c, _ = _coco_scores(refs, cands)
    np.testing.assert_allclose([out[k] for k in C.BLEU_NAMES], b, atol=TOL)
    assert out["rouge_l"] == pytest.approx(r, abs=TOL) and out["cider_d"] == pytest.approx(c, abs=TOL)
    assert out["cider_d"] > 1.0 and out["bleu1"] > 0.5


def _generated(tok, texts, length, rng):
    """Rows like a decoder's output: SOT, tokens, EOT, then junk ids (not pad) to the end."""
    rows = tok(texts, length)
    for row in rows:
        end = int(np.flatnonzero(row == tok.eot_id)[0])
        row[end + 1:] = rng.integers(1, 200, size=length - end - 1)
    return rows


@pytest.mark.parametrize("name", ["byte", "clip_bpe"])
def test_decode_generated_and_evaluate(name):
    tok = get_tokenizer(name)
    rng = np.random.default_rng(0)
    texts = ["a small red seven", "two digits: a blue two and a green nine", "x"]
    ids = _generated(tok, texts, 64, rng)
    assert np.all(ids[:, -1] != 0)  # the junk after EOT is really there to be cut off
    decoded = C.decode_generated(ids, tok)
    assert [C.tokenize(t) for t in decoded] == [C.tokenize(t) for t in texts]
    # Without SOT, and a row with no EOT at all (decoded whole).
    assert C.decode_generated(ids[:, 1:], tok) == decoded
    no_eot = np.asarray([tok.sot_id] + tok.encode("a dog"))
    assert C.tokenize(C.decode_generated(no_eot, tok)[0]) == "a dog"
    refs = [[texts[0], "a red seven"], [texts[1]], ["a cat and a one"]]
    out = C.evaluate_generated(ids, refs, tok, class_names=DIGITS)
    assert out == C.caption_metrics(decoded, refs, DIGITS)
    assert out["digits_correct"] == pytest.approx(2 / 3)  # "x" misses its reference's "one"
    assert "digits_correct" not in C.evaluate_generated(ids, refs, tok)
    assert out["rouge_l"] == pytest.approx((1 + 1 + 0) / 3)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        C.decode_generated(np.zeros((2, 3, 4), np.int32), tok)


def test_byte_tokenizer_decode_drops_special_ids():
    tok = ByteTokenizer()
    assert tok.decode([tok.sot_id, *tok.encode("a b"), tok.eot_id, 0, 0]) == "a b"


def test_metric_specs():
    specs = C.caption_metric_specs(digits=True)
    out = C.caption_metrics(["a dog"], [["a dog"]], class_names=DIGITS)
    assert set(specs) == set(out) == set(C.METRIC_NAMES) | {"digits_correct"}
    assert all(s.name == k and s.higher_is_better for k, s in specs.items())
    assert all(specs[k].is_fraction for k in (*C.BLEU_NAMES, "rouge_l", "digits_correct"))
    assert "multiset" in specs["digits_correct"].description
    assert not specs["cider_d"].is_fraction and specs["cider_d"].unit == "CIDEr-D"
    assert specs["bleu4"].format(0.25) == "25.00%"
    assert set(C.caption_metric_specs()) == set(C.METRIC_NAMES)
    prefixed = C.caption_metric_specs(prefix="val/")
    assert set(prefixed) == {"val/" + k for k in C.METRIC_NAMES}
    assert all(s.name == k for k, s in prefixed.items())
    evaluator = DescribedEvaluator(lambda m, v: out, specs)
    assert evaluator(None, None) == out
    with pytest.raises(KeyError):
        DescribedEvaluator(lambda m, v: out, C.caption_metric_specs())(None, None)


def test_named_classes():
    assert C.named_classes("two digits: a small red seven and a large blue two", DIGITS) == ["seven", "two"]
    assert C.named_classes(b"One digit: a large blue FOUR.", DIGITS) == ["four"]  # bytes, case, punctuation
    assert C.named_classes("three digits: a one, a one and a nine", DIGITS) == ["one", "one", "nine"]
    assert C.named_classes("seventeen 17 sevens twos", DIGITS) == []  # whole words only
    assert C.named_classes("a seven written in red", DIGITS) == ["seven"]
    assert C.named_classes("no colon: two", DIGITS) == ["two"]
    assert C.named_classes("", DIGITS) == []
    # Generic: any class names, multi-word ones matched as word sequences, longest first.
    names = ["dog", "hot dog", "traffic light"]
    assert C.named_classes("a hot dog near a dog under a traffic light", names) == ["hot dog", "dog", "traffic light"]
    with pytest.raises(ValueError, match="no words"):
        C.named_classes("a dog", ["dog", "!!"])


def test_classes_named_correctly():
    ref = "two digits: a small red seven and a large blue two"
    cases = [
        ("two digits: a small red seven and a large blue two", True),    # the reference itself
        ("two digits: a large blue two and a small red seven", True),    # order swapped: still right
        ("a seven and a two", True),                                      # no prefix, other wording
        ("two digits: a small red seven and a large blue seven", False),  # a wrong digit
        ("one digit: a small red seven", False),                          # a missing digit
        ("three digits: a seven, a two and a one", False),                # an extra digit
        ("two digits: a small red seven", False),   # the count "two" is not the missing two
        ("two digits:", False),                     # a count prefix alone names nothing
        ("a red 7 and a blue 2", False),            # numerals are not class names
        ("", False),
    ]
    captions = [c for c, _ in cases]
    got = C.classes_named_correctly(captions, [ref] * len(cases), DIGITS)
    assert got.dtype == bool and got.tolist() == [ok for _, ok in cases]
    # A repeated digit counts as often as it is named; bytes on either side.
    assert C.classes_named_correctly([b"a one, a one and a nine"], [b"three digits: a nine, a one and a one"],
                                     DIGITS).tolist() == [True]
    assert C.classes_named_correctly(["a one and a nine"], ["three digits: a one, a one and a nine"],
                                     DIGITS).tolist() == [False]
    # References as class indices (negative = padding), e.g. a scene's digits.
    got = C.classes_named_correctly(["two digits: a seven and a two", "a seven and a seven", "one digit: a four"],
                                    [[2, 7, -1], np.array([7, 2, -1]), np.array([4, -1, -1])], DIGITS)
    assert got.tolist() == [True, False, True]
    # The caption_metrics entry is this function's mean (against the first non-empty reference).
    out = C.caption_metrics([cases[1][0], cases[3][0]], [["", ref, "a seven"], [ref]], DIGITS)
    assert out["digits_correct"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="references"):
        C.classes_named_correctly(captions, [ref], DIGITS)


def test_classes_named_on_digit_scenes_captions():
    """digit_scenes' first caption (the eval reference) names every digit of the scene, so it is
    correct against the scene's digits and against itself, and wrong against other digits."""
    rng = np.random.default_rng(0)
    firsts, truths = [], []
    for _ in range(200):
        n = int(rng.integers(1, 4))
        xs = np.sort(rng.choice(np.arange(0, 40, 2), size=n, replace=False))
        ys = rng.integers(0, 40, size=n)
        boxes = np.stack([xs, ys, xs + 16, ys + 16], -1)
        layout = Layout(digits=rng.integers(0, 10, n), colours=rng.integers(0, len(COLOUR_NAMES), n),
                        sizes=rng.integers(0, 2, n), sources=np.zeros(n, int), boxes=boxes,
                        paint_order=np.arange(n))
        firsts.append(scene_captions(rng, layout, 64, 5)[0])
        truths.append(layout.digits)
    assert C.classes_named_correctly(firsts, truths, DIGITS).all()
    assert C.classes_named_correctly(firsts, firsts, DIGITS).all()
    shifted = [(d + 1) % 10 for d in truths]
    assert not C.classes_named_correctly(firsts, shifted, DIGITS).any()
    dropped = [d[:-1] for d in truths]
    assert not C.classes_named_correctly(firsts, dropped, DIGITS).any()
