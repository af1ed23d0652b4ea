"""colearn_jax.data: tokenizers, CLIP image preprocessing, the local TFDS builders `digits_captions`
and `digit_scenes`, grain pipelines and the device prefetcher. Names from the modules that import
TFDS and grain load lazily."""
from colearn_jax.data.image_ops import (CLIP_MEAN, CLIP_STD, clip_preprocess, device_normalize, normalize,
                                        random_translate, resize_short_side_center_crop)
from colearn_jax.data.tokenizers import (ByteTokenizer, ClipBpeTokenizer, find_clip_vocab,
                                         get_tokenizer)

_LAZY = {
    "DigitsCaptions": "digits", "CLASS_NAMES": "digits", "ZEROSHOT_TEMPLATES": "digits",
    "CAPTION_TEMPLATES": "digits", "ensure_built": "digits", "DigitScenes": "digit_scenes",
    "make_source": "pipeline", "make_train_iterator": "pipeline", "iterate_eval": "pipeline",
    "default_data_config": "pipeline", "device_prefetch": "prefetch", "DevicePrefetcher": "prefetch",
}

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "clip_preprocess", "device_normalize", "normalize", "random_translate",
    "resize_short_side_center_crop", "ByteTokenizer", "ClipBpeTokenizer", "find_clip_vocab",
    "get_tokenizer", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib  # pylint: disable=import-outside-toplevel

        return getattr(importlib.import_module(f"colearn_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'colearn_jax.data' has no attribute {name!r}")
