"""Zero-shot classification with prompt-template ensembling (Radford et al. 2021, Sec. 3.1.4).

Each class's weight is the normalised mean of the normalised text embeddings of its prompts
("a photo of the digit {}." ...); an image is assigned the class of highest cosine similarity.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def zeroshot_classifier(
    encode_text: Callable[[np.ndarray], np.ndarray],
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    context_length: int,
) -> np.ndarray:
    """Returns [num_classes, D] unit-norm class embeddings. `encode_text` maps ids -> unit embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = np.array(encode_text(tokenizer(prompts, context_length)), np.float32)
    emb = emb.reshape(len(class_names), len(templates), -1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    weights = emb.mean(axis=1)
    return weights / np.linalg.norm(weights, axis=-1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k (k capped at the number of classes)."""
    order = np.argsort(-logits, axis=-1)
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[-1])
        out[f"top{k}"] = float(np.mean(np.any(order[:, :k_eff] == labels[:, None], axis=-1)))
    return out
