"""Image<->text retrieval Recall@K (Karpathy & Fei-Fei 2015 protocol, as in Radford et al. 2021, Sec. 3.2).

`text_to_image[j]` is the index of the image caption j describes (several captions per image allowed).
An image->text query hits at K if any of its captions is among the K most similar texts; a
text->image query hits at K if its image is among the K most similar images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def retrieval_recall(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    if text_to_image is None:
        if len(image_embeds) != len(text_embeds):
            raise ValueError("Without text_to_image, image and text counts must match (one caption per image).")
        text_to_image = np.arange(len(text_embeds))
    text_to_image = np.asarray(text_to_image)
    sim = image_embeds @ text_embeds.T  # [n_images, n_texts]
    out = {}
    # text -> image: rank of the true image for each text
    t2i_order = np.argsort(-sim.T, axis=-1)
    t2i_rank = np.argmax(t2i_order == text_to_image[:, None], axis=-1)
    # image -> text: best rank among the image's captions
    i2t_order = np.argsort(-sim, axis=-1)
    owner = text_to_image[i2t_order]  # [n_images, n_texts] image owning each ranked text
    hits = owner == np.arange(len(image_embeds))[:, None]
    i2t_rank = np.where(hits.any(-1), np.argmax(hits, axis=-1), sim.shape[1])
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    return out
