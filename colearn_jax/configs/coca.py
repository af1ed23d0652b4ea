"""CoCa configs. Run:  python experiments/train.py --config=configs/coca.py:scenes --workdir=/tmp/coca_scenes

Presets (`--config=configs/coca.py:<preset>`), each docstring's first line the command that runs it:
  tiny    seconds on a CPU, for tests (bundled digits captions, 16 px).
  scenes  the CPU demo on `digit_scenes/scenes` (64 px scenes of 1-3 digits, the caption naming every
          digit; word tokens, conv stem): trains on a 2-core CPU in under 20 minutes; evaluates
          zero-shot digit classification on `digit_scenes/single` and greedy captions on the test split.
  scenes_tagged  `scenes` + an auxiliary tagging loss on the scene's digits (Tag2Text-style; declared
          extra supervision, see its docstring).
  base    open_clip's coca_ViT-B-32 sizes on TFDS `coco_captions` (CLIP BPE tokenizer).
  large   open_clip's coca_ViT-L-14 sizes on TFDS `coco_captions`.

The fields CoCa adds to colearn_jax/configs/base.py: `model` (towers, poolers, decoder), `loss`
(lambda_con, lambda_cap, gather, label_smoothing), the image+caption `data` fields of the shared
pipeline (colearn_jax/data/pipeline.py) and `eval` (zero-shot, captioning).
"""
import math

import ml_collections
from ml_collections import config_dict

from colearn_jax.configs import base

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_TEMPLATES = ["a photo of the digit {}", "a handwritten {}", "an image of the numeral {}", "the number {}"]
# digit_scenes.ZEROSHOT_TEMPLATES (the `single` scenes' caption style)
SCENES_TEMPLATES = ["the digit {}", "one digit: a {}", "a small {}", "a large {}"]


def _base() -> ml_collections.ConfigDict:
    """python experiments/train.py --config=configs/coca.py:scenes --workdir=/tmp/coca_scenes"""
    c = base.get_config()
    c.model.name = "coca"
    c.model.embed_dim = 64
    c.model.activation = "gelu"
    c.model.dtype = "float32"
    c.model.scan = False
    c.model.remat_policy = "none"
    c.model.attention_impl = config_dict.placeholder(str)
    c.model.dropout = 0.0
    c.model.init_logit_scale = math.log(1 / 0.07)
    c.model.pooler = "open_clip"  # paper: 1-query contrastive + N-query captioning poolers
    c.model.num_queries = 16  # open_clip: all queries (the first is the contrastive one); paper: captioning ones
    c.model.pooler_heads = 4
    c.model.tie_embeddings = False
    c.model.legacy_cls_mask = False  # True for released open_clip CoCa weights
    c.model.num_tags = 0  # > 0: an image tagging head on the ViT tokens, trained when loss.lambda_tag > 0
    c.model.tag_pool = "mean"  # mean: the mean token's tag logits | max: each tag's best token
    c.model.vision = ml_collections.ConfigDict(
        dict(image_size=64, patch_size=8, width=96, layers=4, heads=4, mlp_ratio=4.0, stem="patch"))
    # context_length: text positions before the appended CLS token
    c.model.text = ml_collections.ConfigDict(
        dict(vocab_size=259, context_length=96, width=64, layers=2, heads=4, mlp_ratio=4.0))
    # width = text width; memory_ln: LayerNorm on the image memory inside each cross-attention (open_clip)
    c.model.decoder = ml_collections.ConfigDict(dict(layers=2, heads=4, mlp_ratio=4.0, memory_ln=True))

    # lambda_tag: weight of the auxiliary tagging loss (the tag head against the image's tags in data.tag_key;
    # Tag2Text-style, not in the CoCa paper): 0 = CoCa's own objective. tag_loss: "sigmoid" (independent
    # binary cross-entropies) or "softmax" (cross-entropy against the tags' uniform distribution).
    # lambda_token_tag: weight of the per-token tagging loss (token labelling: the same head on every patch
    # token against its share of each digit's ink; needs data.segmentation_key and data.tag_key).
    c.loss = ml_collections.ConfigDict(dict(lambda_con=1.0, lambda_cap=2.0, gather="auto", label_smoothing=0.0,
                                            lambda_tag=0.0, tag_loss="sigmoid", lambda_token_tag=0.0))

    c.data.name = "digit_scenes/scenes"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"
    c.data.text_key = "caption"  # the caption naming every digit, left to right
    c.data.tag_key = config_dict.placeholder(str)  # with loss.lambda_tag: int [tag_slots] tag ids, -1 padded
    c.data.tag_slots = 3
    c.data.segmentation_key = config_dict.placeholder(str)  # with loss.lambda_token_tag: uint8 [S, S, 1] instance map
    c.data.label_key = config_dict.placeholder(str)
    c.data.image_size = 64
    c.data.context_length = 96
    c.data.batch_size = 64
    c.data.eval_batch_size = 100
    c.data.augment = False
    c.data.tokenizer = "byte"
    c.data.vocab_path = config_dict.placeholder(str)
    c.data.cache_decoded = True
    c.data.mixture = []
    c.data.normalize_on_device = False
    # on-device augmentation of training images: affine = a small random rotation (degrees), scale and shear,
    # plus an elastic distortion of up to elastic_alpha pixels (smoothed over elastic_sigma pixels) when > 0
    c.augment = ml_collections.ConfigDict(dict(affine=False, rotate=10.0, scale=(0.9, 1.1), shear=10.0,
                                               elastic_alpha=0.0, elastic_sigma=4.0))

    c.optim.update(name="adamw", lr=2e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, warmup_steps=100,
                   schedule="cosine", end_lr_factor=0.0, grad_clip_norm=1.0)
    c.train.update(num_steps=1000, log_every=50, eval_every=500, checkpoint_every=500,
                   best_metric="caption_digits_correct")

    c.eval.zeroshot = True
    c.eval.zeroshot_data = "digit_scenes/single"  # a labelled dataset; "" = the eval split (needs labels)
    c.eval.zeroshot_split = "test"
    c.eval.class_names = list(DIGIT_NAMES)
    c.eval.templates = list(SCENES_TEMPLATES)
    c.eval.retrieval = False  # image<->text Recall@K on the zero-shot data
    c.eval.captions = True  # captions of the eval split
    c.eval.caption_method = "greedy"  # greedy | beam
    c.eval.caption_num_beams = 3
    c.eval.caption_max_new_tokens = 95  # <= model.text.context_length - 1 (after the start token)
    c.eval.caption_max_batches = 5  # eval batches captioned (0: the whole split)
    return c


def _tiny(c):
    """python experiments/train.py --config=configs/coca.py:tiny --workdir=/tmp/coca_tiny"""
    c.model.embed_dim = 16
    c.model.num_queries = 5
    c.model.pooler_heads = 2
    c.model.vision.update(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    c.model.text.update(context_length=24, width=32, layers=1, heads=2)
    c.model.decoder.update(layers=1, heads=2)
    c.data.update(name="digits_captions", text_key="captions", label_key="label", image_size=16, context_length=24,
                  batch_size=32, eval_batch_size=40)
    c.eval.update(zeroshot_data="", templates=list(DIGITS_TEMPLATES), caption_max_new_tokens=12,
                  caption_max_batches=1)
    c.train.update(num_steps=8, log_every=2, eval_every=8, checkpoint_every=4, progress_bar=False,
                   compilation_cache_dir="", best_metric="zeroshot_top1")
    c.optim.warmup_steps = 2
    return c


def _scenes(c):
    """python experiments/train.py --config=configs/coca.py:scenes --workdir=/tmp/coca_scenes

    One token per word (the built-in `digit_scenes` word list: 76 ids, captions of at most 17 tokens instead
    of 60-90 bytes) and the ViT's convolutional stem (Xiao et al. 2021): a supervised control on `single`
    (experiments/digit_readout_control.py) reads the digit at 80.8 % after 400 steps with it, 49.5 % with the
    patch stem. 2500 steps of
    batch 64: ~13 min of training on a 2-core CPU (~210 examples/s), plus the evaluations."""
    c.model.vision.stem = "conv"
    c.model.text.update(vocab_size=76, context_length=32)
    c.data.update(tokenizer="words", vocab_path="digit_scenes", context_length=32)
    c.eval.caption_max_new_tokens = 31
    c.train.update(num_steps=2500, eval_every=500, checkpoint_every=500)
    return c


def _scenes_tagged(c):
    """python experiments/train.py --config=configs/coca.py:scenes_tagged --workdir=/tmp/coca_scenes_tagged

    `scenes` plus an auxiliary image-tagging loss (not in the CoCa paper; Tag2Text, Huang et al. 2023, Sec.
    3.2, tags images with words parsed from their captions): a linear head on the mean ViT token predicts
    the scene's digit multiset (`box_digits`, the digits its caption names), softmax cross-entropy against
    it, weight 4; the same head on every patch token against that patch's share of each digit's ink (token
    labelling, Jiang et al. 2021, Sec. 3; read from the scene's instance map `segmentation`), weight 1; and
    small random affine warps of the training images and their instance maps (rotation 10 deg, scale
    0.9-1.1, shear 10 deg: new handwriting, same caption). Pure captioning gradients teach this small ViT
    to read digits slowly (the supervised control, experiments/digit_readout_control.py); the tag losses
    reach the encoder directly, the per-token one at each digit's place (1000-step lever: 43.4 % of
    validation captions with every digit right under teacher forcing, 35.4 % without it). The decoder
    reads its memory without a LayerNorm (`model.decoder.memory_ln=False`; open_clip's weights need it,
    these do not: 70.7 vs 70.5 % at 3000 steps, `full_runs` in experiments/results/coca_digit_levers.json).
    3300 steps of batch 64: ~18 min on a 2-core CPU with the evaluations."""
    c = _scenes(c)
    c.model.update(num_tags=10, tag_pool="mean")
    c.loss.update(lambda_tag=4.0, tag_loss="softmax")
    c.loss.lambda_token_tag = 1.0
    c.data.update(tag_key="box_digits", tag_slots=3, segmentation_key="segmentation")
    c.augment.affine = True
    c.model.decoder.memory_ln = False
    c.train.update(num_steps=3300, eval_every=1650, checkpoint_every=1650)
    return c


def _coco(c, *, embed, vision, text, decoder_heads, pooler_heads):
    c.model.update(embed_dim=embed, scan=True, pooler="open_clip", num_queries=256, pooler_heads=pooler_heads,
                   legacy_cls_mask=False)
    c.model.vision.update(vision)
    c.model.text = ml_collections.ConfigDict(text)
    c.model.decoder = ml_collections.ConfigDict(dict(layers=12, heads=decoder_heads, mlp_ratio=4.0, memory_ln=True))
    c.data.update(name="coco_captions", train_split="train", eval_split="val", text_key="captions/text",
                  label_key=None, image_size=224, context_length=76, batch_size=256, eval_batch_size=256,
                  tokenizer="clip_bpe", cache_decoded=False)
    c.eval.update(zeroshot=False, retrieval=False, class_names=[], templates=[], caption_method="beam",
                  caption_num_beams=3, caption_max_new_tokens=29, caption_max_batches=20)
    c.optim.update(lr=5e-4, warmup_steps=10_000, weight_decay=0.2)
    c.train.update(num_steps=100_000, eval_every=5000, checkpoint_every=2000, log_every=100, best_metric="")
    return c


def _base_b32(c):
    """python experiments/train.py --config=configs/coca.py:base --workdir=/tmp/coca_base"""
    return _coco(c, embed=512, vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0),
                 text=dict(vocab_size=49408, context_length=76, width=512, layers=12, heads=8, mlp_ratio=4.0),
                 decoder_heads=8, pooler_heads=8)


def _large_l14(c):
    """python experiments/train.py --config=configs/coca.py:large --workdir=/tmp/coca_large"""
    return _coco(c, embed=768, vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                                           mlp_ratio=4.0),
                 text=dict(vocab_size=49408, context_length=76, width=768, layers=12, heads=12, mlp_ratio=4.0),
                 decoder_heads=12, pooler_heads=8)


PRESETS = {"tiny": _tiny, "scenes": _scenes, "scenes_tagged": _scenes_tagged, "base": _base_b32, "large": _large_l14}


def get_config(arg: str = "scenes") -> ml_collections.ConfigDict:
    """`arg` = preset name (tiny | scenes | scenes_tagged | base | large)."""
    preset = arg or "scenes"
    if preset not in PRESETS:
        raise ValueError(f"Unknown CoCa preset {preset!r}; choose one of {sorted(PRESETS)}.")
    c = PRESETS[preset](_base())
    c.lock()
    return c
