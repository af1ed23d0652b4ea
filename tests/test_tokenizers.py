"""Tokenizer tests: byte tokenizer behaviour and exact id parity of the CLIP BPE with open_clip."""
import random

import numpy as np
import pytest

from colearn_jax.data import tokenizers
from colearn_jax.data.tokenizers import ByteTokenizer, ClipBpeTokenizer, get_tokenizer


# ---------------------------------------------------------------- byte tokenizer

def test_byte_tokenizer_layout_and_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 257, 258)
    assert tok.eot_id == tok.vocab_size - 1  # the largest id: text towers pool at argmax
    text = "Hello, wörld! 数字 7 🙂"
    ids = tok(text, 64)
    assert ids.shape == (1, 64) and ids.dtype == np.int32
    n = len(text.encode("utf-8"))
    assert ids[0, 0] == tok.sot_id and ids[0, n + 1] == tok.eot_id
    assert np.all(ids[0, n + 2:] == 0) and np.all(ids[0, 1:n + 1] >= 1)
    assert int(ids.max()) == tok.eot_id
    assert tok.encode(text) == [b + 1 for b in text.encode("utf-8")]
    assert tok.decode(ids[0]) == text
    assert tok.decode(tok.encode("plain")) == "plain"


# ---------------------------------------------------------------- word tokenizer

def test_word_tokenizer_layout_round_trip_and_unknown_words(tmp_path):
    tok = tokenizers.WordTokenizer(["two", "digits", "a", "red", "seven", ":", ",", "and", "?"])
    assert (tok.pad_id, tok.unk_id) == (0, 1) and tok.eot_id == tok.vocab_size - 1 == tok.sot_id + 1
    text = "two digits: a red seven, and a red two"
    ids = tok(text, 16)[0]
    words = tokenizers.split_words(text)
    assert words[:3] == ["two", "digits", ":"] and len(words) == 11
    assert ids[0] == tok.sot_id and ids[len(words) + 1] == tok.eot_id and not ids[len(words) + 2:].any()
    assert tok.decode(ids) == text  # punctuation re-attached, specials and padding dropped
    assert tok.encode("A Blue seven") == [tok.encode("a")[0], tok.unk_id, tok.encode("seven")[0]]
    assert tok.decode(tok.encode("a blue seven")) == "a <unk> seven"
    short = tok(text, 5)[0]  # truncation keeps EOT last
    assert short[-1] == tok.eot_id and list(short[1:4]) == list(ids[1:4])
    # from training texts (frequency order, min_count) and back through a file
    built = tokenizers.WordTokenizer.from_texts(["a red seven", "a blue two", "a red two"], min_count=2)
    assert built.words == ("a", "red", "two")
    path = built.save(str(tmp_path / "vocab.txt"))
    again = get_tokenizer("words", path)
    assert again.words == built.words and np.array_equal(again("a red two", 8), built("a red two", 8))
    with pytest.raises(ValueError, match="single lower-case words"):
        tokenizers.WordTokenizer(["two digits"])
    with pytest.raises(ValueError, match="vocab_path"):
        get_tokenizer("words", None)
    with pytest.raises(FileNotFoundError, match="built-in vocabulary"):
        get_tokenizer("words", str(tmp_path / "missing.txt"))


def test_byte_tokenizer_batch_padding_and_truncation():
    tok = ByteTokenizer()
    ids = tok(["a", "abc", "x" * 100], 8)
    assert ids.shape == (3, 8)
    np.testing.assert_array_equal(ids[0], [257, 98, 258, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [257, 98, 99, 100, 258, 0, 0, 0])
    assert ids[2, 0] == 257 and ids[2, -1] == 258 and np.all(ids[2, 1:-1] == ord("x") + 1)
    empty = tok("", 4)
    np.testing.assert_array_equal(empty[0], [257, 258, 0, 0])
    with pytest.raises(ValueError, match="context_length"):
        tok("a", 1)


def _row_cache_checks(tok, texts):
    for text in texts:
        for length in (4, 16):
            row = tok.row(text, length)
            np.testing.assert_array_equal(row, tok(text, length)[0])  # cut and EOT at length 4 too
            assert row.shape == (length,) and row.dtype == np.int32 and not row.flags.writeable
    before = tok.row_cache_info()
    assert tok.row(texts[0], 16) is tok.row(texts[0].encode("utf-8"), 16)  # bytes and str: one entry
    after = tok.row_cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses
    assert after.currsize == 2 * len(set(texts))  # keyed by (text, context_length)


def test_byte_tokenizer_row_cache():
    import pickle

    tok = ByteTokenizer()
    _row_cache_checks(tok, ["a handwritten seven", "the number 7", "x" * 40, "数字"])
    fresh = pickle.loads(pickle.dumps(tok))  # grain worker processes get a copy
    assert fresh.row_cache_info().currsize == 0
    np.testing.assert_array_equal(fresh.row("the number 7", 16), tok.row("the number 7", 16))


def test_clip_bpe_row_cache():
    tok = ClipBpeTokenizer(tokenizers.find_clip_vocab())  # a private instance: a fresh cache
    _row_cache_checks(tok, ["a photo of the digit seven", "Ångström café", "a grey sketch of a 3"])


def test_get_tokenizer_names_and_errors(monkeypatch):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="'wordpiece'"):
        get_tokenizer("wordpiece")
    monkeypatch.setattr(tokenizers, "find_clip_vocab", lambda: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch"):
        get_tokenizer("clip_bpe")
    with pytest.raises(FileNotFoundError, match="not found"):
        get_tokenizer("clip_bpe", vocab_path="/nonexistent/bpe.txt.gz")


# ---------------------------------------------------------------- CLIP BPE parity

_WORDS = ("a photo of the cat dog sitting on table with red blue green big small tiny "
          "running jumping playing near under over two three people children woman man "
          "street city beach mountain snow pizza sandwich skateboard giraffe zebra airplane "
          "donut refrigerator umbrella hydrant microwave broccoli toothbrush teddy bear").split()
_UNICODE = ["café", "naïve", "résumé", "Ångström", "straße", "Zürich", "niño", "crème brûlée",
            "東京", "数字", "Ελληνικά", "русский", "עברית", "العربية", "😀", "🐶🐱", "👍🏽",
            "🇫🇷", "—", "…", "“quoted”", "‘single’", "½", "™", "©", "°C", "µm", "ﬁne", "Ⅻ",
            "cafÃ©", "â€œmojibakeâ€\x9d", "\u00a0nbsp\u00a0", "zero\u200bwidth", "e\u0301"]
_ENTITIES = ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&amp;amp;", "&nbsp;", "&eacute;",
             "&#x1F600;", "&copy;", "&unknown;"]
_PUNCT = [",", ".", "!", "?", "...", ";", ":", "-", "--", "(", ")", "[x]", "{y}", "#tag",
          "@user", "$5.99", "100%", "3.14", "1,000", "x2", "2x", "co-op", "e-mail", "a/b",
          "http://example.com/a?b=c", "<start_of_text>", "<end_of_text>", "<|endoftext|>", "'",
          "it's", "we'll", "DON'T", "they're", "I'm", "you've", "he'd", "'s", "__init__", "~~~"]
_SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\r\n", "\u3000", "\x0c", "\x1f", "\x85"]


def _caption(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 14)):
        r = rng.random()
        if r < 0.5:
            w = rng.choice(_WORDS)
            r = rng.random()
            parts.append(w.upper() if r < 0.1 else w.capitalize() if r < 0.3 else w)
        elif r < 0.62:
            parts.append(rng.choice(_UNICODE))
        elif r < 0.7:
            parts.append(rng.choice(_ENTITIES))
        elif r < 0.85:
            parts.append(rng.choice(_PUNCT))
        else:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
    out = ""
    for p in parts:
        r = rng.random()
        out += p + (rng.choice(_SPACES) if r < 0.15 else "" if r < 0.25 else " ")
    return out


def _corpus() -> list:
    rng = random.Random(20240611)
    texts = [_caption(rng) for _ in range(520)]
    texts += [" ".join(_caption(rng) for _ in range(rng.randint(6, 12))) for _ in range(30)]  # > 77
    texts += ["", "   ", "A", "&amp;amp;amp;", "a" * 300, "1234567890" * 10, "🙂" * 50]
    return texts


@pytest.fixture(scope="module")
def clip_pair():
    import open_clip  # the [parity] extra is installed for the test suite

    return get_tokenizer("clip_bpe"), open_clip


def test_clip_vocab_found_without_importing_open_clip():
    path = tokenizers.find_clip_vocab()
    assert path is not None and path.endswith("open_clip/" + tokenizers.CLIP_VOCAB_FILENAME)
    tok = ClipBpeTokenizer(path)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)


def test_clip_bpe_parity_with_open_clip(clip_pair):
    tok, open_clip = clip_pair
    texts = _corpus()
    assert len(texts) >= 500
    ours = tok(texts, 77)
    ref = open_clip.tokenize(texts, context_length=77).numpy()
    assert ours.dtype == np.int32 and ours.shape == ref.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]!r}"
    truncated = ref[:, -1] != 0
    assert truncated.sum() >= 20 and np.all(ours[truncated, -1] == tok.eot_id)
    short = texts[:60]
    ref16 = open_clip.tokenize(short, context_length=16).numpy()
    np.testing.assert_array_equal(tok(short, 16), ref16)
    assert tok.encode(texts[3]) == open_clip.tokenizer._tokenizer.encode(texts[3])


def test_clip_bpe_single_string_and_decode(clip_pair):
    tok, _ = clip_pair
    ids = tok("A Photo of the Digit Seven!", 16)
    assert ids.shape == (1, 16) and int(ids.max()) == tok.eot_id == int(ids[0, ids[0].argmax()])
    assert tok.decode(ids[0]) == "a photo of the digit seven !"
