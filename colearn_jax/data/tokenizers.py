"""Text tokenizers: a file-free byte tokenizer, a closed-vocabulary word tokenizer and CLIP's
byte-level BPE.

All map `texts -> int32 [N, context_length]` laid out as `SOT, tokens..., EOT, 0, 0, ...`.
End-of-text is the largest id of each vocabulary, so text towers can pool at `argmax(ids)`.
If a text does not fit, it is cut and the last position is set back to EOT.

`WordTokenizer` splits lower-cased text into words and punctuation marks over a fixed word list
(the captioning setting of Show, Attend and Tell, Xu et al. 2015, Sec. 4.3, and of small closed
domains): a named built-in vocabulary (`WORD_VOCABULARIES`, e.g. "digit_scenes") or a file with one
word per line (`WordTokenizer.from_texts(...).save(path)` writes one from training captions). Each
word is one token, so a caption is 5-10x shorter than in bytes.

`ClipBpeTokenizer` reproduces the ids of open_clip's `SimpleTokenizer` / `open_clip.tokenize`
from the released merges file `bpe_simple_vocab_16e6.txt.gz`.

`tokenizer.row(text, context_length)` gives one text's packed ids from an LRU cache keyed by
(text, context_length): input pipelines call it once per example, and captions repeat heavily (the
digits demo has 80 distinct ones). Cached rows are read-only; `__call__` returns fresh arrays.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib
import importlib.util
import os
import re
from typing import Sequence

import numpy as np

CLIP_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_NUM_MERGES = 49152 - 256 - 2
_WORD_END = "</w>"


def _to_array(token_lists: list[list[int]], context_length: int, sot: int, eot: int) -> np.ndarray:
    """Packs token lists into `[N, context_length]` int32 with SOT/EOT and zero padding."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}.")
    out = np.zeros((len(token_lists), context_length), dtype=np.int32)
    for row, tokens in enumerate(token_lists):
        seq = [sot, *tokens, eot]
        if len(seq) > context_length:
            seq = seq[:context_length]
            seq[-1] = eot
        out[row, : len(seq)] = seq
    return out


ROW_CACHE_SIZE = 1 << 16  # packed rows kept per tokenizer (an int32 row of 77 ids is 308 bytes)


class _RowCache:
    """Mixin: `row(text, context_length)` -> read-only int32 [context_length], LRU-cached.

    The cache is rebuilt empty after unpickling (grain worker processes get their own).
    """

    def _init_row_cache(self, maxsize: int = ROW_CACHE_SIZE):
        self._row_cache_size = maxsize
        self._cached_row = functools.lru_cache(maxsize=maxsize)(self._packed_row)

    def _packed_row(self, text: str, context_length: int) -> np.ndarray:
        row = self([text], context_length)[0]
        row.flags.writeable = False
        return row

    def row(self, text: str | bytes, context_length: int) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return self._cached_row(str(text), int(context_length))

    def row_cache_info(self):
        """functools' CacheInfo (hits, misses, maxsize, currsize) of the row cache."""
        return self._cached_row.cache_info()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cached_row", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_row_cache(state.get("_row_cache_size", ROW_CACHE_SIZE))


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]


class ByteTokenizer(_RowCache):
    """UTF-8 bytes as tokens: pad 0, byte b -> b + 1, SOT 257, EOT 258 (no vocabulary file)."""

    pad_id = 0
    sot_id = 257
    eot_id = 258
    vocab_size = 259

    def __init__(self):
        self._init_row_cache()

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(int(i) - 1 for i in np.asarray(ids).reshape(-1) if 1 <= int(i) <= 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str], context_length: int) -> np.ndarray:
        tokens = [self.encode(t) for t in _as_list(texts)]
        return _to_array(tokens, context_length, self.sot_id, self.eot_id)


_WORD_PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_NO_SPACE_BEFORE = set(",.:;?!)")
UNK = "<unk>"


def split_words(text: str) -> list[str]:
    """Lower-cased words (letters/digits runs) and single punctuation marks, in order."""
    return _WORD_PATTERN.findall(text.lower())


class WordTokenizer(_RowCache):
    """One id per word of a fixed list: pad 0, `<unk>` 1, the words 2.., then SOT and EOT (EOT is
    the largest id). Text outside the list maps to `<unk>` (decoded as "<unk>")."""

    pad_id = 0
    unk_id = 1

    def __init__(self, words: Sequence[str]):
        words = list(dict.fromkeys(str(w) for w in words))
        bad = [w for w in words if split_words(w) != [w]]
        if bad:
            raise ValueError(f"WordTokenizer: vocabulary entries must be single lower-case words or "
                             f"punctuation marks; got {bad[:5]}.")
        self._init_row_cache()
        self.words = tuple(words)
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}
        self.sot_id = len(self.words) + 2
        self.eot_id = len(self.words) + 3
        self.vocab_size = len(self.words) + 4

    @classmethod
    def from_texts(cls, texts: Sequence[str], min_count: int = 1) -> "WordTokenizer":
        """The words seen at least `min_count` times in `texts`, most frequent first."""
        counts: dict[str, int] = {}
        for t in _as_list(texts):
            for w in split_words(t):
                counts[w] = counts.get(w, 0) + 1
        return cls(sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)))

    @classmethod
    def from_file(cls, path: str) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls([line.strip() for line in f if line.strip()])

    def save(self, path: str) -> str:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.words) + "\n")
        return path

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids) -> str:
        out = ""
        for i in np.asarray(ids).reshape(-1):
            i = int(i)
            if i == self.unk_id:
                word = UNK
            elif 2 <= i < self.sot_id:
                word = self.words[i - 2]
            else:
                continue
            out += word if (not out or word in _NO_SPACE_BEFORE) else " " + word
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int) -> np.ndarray:
        tokens = [self.encode(t) for t in _as_list(texts)]
        return _to_array(tokens, context_length, self.sot_id, self.eot_id)


# Built-in word lists by name: "module:attribute" of a sequence of words (imported on use).
WORD_VOCABULARIES = {"digit_scenes": "colearn_jax.data.scene_annotate:CAPTION_VOCAB"}


def word_vocabulary(name_or_path: str) -> WordTokenizer:
    """A `WordTokenizer` from a built-in vocabulary name or a one-word-per-line file."""
    if name_or_path in WORD_VOCABULARIES:
        module, attr = WORD_VOCABULARIES[name_or_path].split(":")
        return WordTokenizer(getattr(importlib.import_module(module), attr))
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(
            f"The 'words' tokenizer needs data.vocab_path = a built-in vocabulary "
            f"({sorted(WORD_VOCABULARIES)}) or a file with one word per line; {name_or_path!r} is neither.")
    return WordTokenizer.from_file(name_or_path)


@functools.lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """Reversible byte -> printable unicode char table used by byte-level BPE vocabularies.

    Bytes that are printable latin-1 characters (other than space) stand for themselves; the
    remaining bytes are assigned the code points 256, 257, ... in byte order. Insertion order
    (printable bytes first) defines the first 256 vocabulary entries.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clean(text: str) -> str:
    """CLIP text clean-up: ftfy, double html unescape, collapse whitespace, lower-case."""
    import ftfy  # pylint: disable=import-outside-toplevel

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()  # str.split's notion of whitespace, as in CLIP


class ClipBpeTokenizer(_RowCache):
    """CLIP byte-level BPE (49408 ids; SOT 49406, EOT 49407, pad 0)."""

    pad_id = 0
    vocab_size = 49408

    def __init__(self, vocab_path: str):
        import regex  # pylint: disable=import-outside-toplevel

        self._init_row_cache()
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1]]
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._b2c = _byte_to_char()
        self._c2b = {c: b for b, c in self._b2c.items()}
        base = list(self._b2c.values())
        specials = ["<start_of_text>", "<end_of_text>"]
        tokens = base + [c + _WORD_END for c in base] + ["".join(m) for m in merges] + specials
        self._encoder = {tok: i for i, tok in enumerate(tokens)}
        self._decoder = dict(enumerate(tokens))
        if len(tokens) != self.vocab_size:
            raise ValueError(f"{vocab_path}: {len(tokens)} tokens, expected {self.vocab_size}.")
        self.sot_id = self._encoder["<start_of_text>"]
        self.eot_id = self._encoder["<end_of_text>"]
        self._cache = {s: [self._encoder[s]] for s in specials}
        self._pattern = regex.compile(
            "|".join(specials) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already mapped to byte chars); results are cached per word."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + _WORD_END]
        while len(parts) > 1:
            # Lowest-rank adjacent pair; stop when no adjacent pair is a known merge.
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = self._ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._encoder[p] for p in parts]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text)):
            word = "".join(self._b2c[b] for b in piece.encode("utf-8"))
            ids.extend(self._bpe(word))
        return ids

    def decode(self, ids) -> str:
        skip = {self.pad_id, self.sot_id, self.eot_id}
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        text = "".join(self._decoder[i] for i in ids if i not in skip and i in self._decoder)
        data = bytearray()
        for chunk in text.split(_WORD_END):
            data.extend(self._c2b[c] for c in chunk)
            data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
        tokens = [self.encode(t) for t in _as_list(texts)]
        return _to_array(tokens, context_length, self.sot_id, self.eot_id)


def find_clip_vocab() -> str | None:
    """Path of CLIP's merges file in an installed `open_clip` package (found without importing)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (getattr(spec, "submodule_search_locations", None) or []) if spec else []:
        path = os.path.join(folder, CLIP_VOCAB_FILENAME)
        if os.path.exists(path):
            return path
    return None


TOKENIZER_NAMES = ("byte", "words", "clip_bpe")


@functools.lru_cache(maxsize=4)
def _clip_bpe(path: str) -> ClipBpeTokenizer:
    return ClipBpeTokenizer(path)


@functools.lru_cache(maxsize=8)
def _words(name_or_path: str) -> WordTokenizer:
    return word_vocabulary(name_or_path)


def get_tokenizer(name: str, vocab_path: str | None = None):
    """Returns a tokenizer by name: "byte" (no file), "words" (`vocab_path` = a built-in vocabulary
    name or a word-list file) or "clip_bpe" (CLIP merges file)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "words":
        if not vocab_path:
            raise ValueError(f"The 'words' tokenizer needs data.vocab_path: a built-in vocabulary "
                             f"({sorted(WORD_VOCABULARIES)}) or a file with one word per line.")
        return _words(vocab_path)
    if name == "clip_bpe":
        path = vocab_path or find_clip_vocab()
        if path is None:
            raise FileNotFoundError(
                f"The 'clip_bpe' tokenizer needs CLIP's merges file {CLIP_VOCAB_FILENAME}. Either "
                "`pip install open_clip_torch` (the wheel ships it as "
                f"open_clip/{CLIP_VOCAB_FILENAME}) or download it from the openai/CLIP or "
                "mlfoundations/open_clip repository and pass vocab_path=<file>.")
        if not os.path.exists(path):
            raise FileNotFoundError(f"CLIP vocab file not found: {path!r}.")
        return _clip_bpe(os.path.abspath(path))
    raise ValueError(f"Unknown tokenizer name {name!r}; expected one of {TOKENIZER_NAMES}.")
