"""ImageBind as a trainable system (Girdhar et al. 2023, Sec. 3.2 "Binding modalities with images"):
symmetric InfoNCE between the image embedding and each paired modality, over the global batch.

L_{I,M} = -log exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau) (+ the M->I direction), q image, k the
modality's embedding, 1/tau the modality's postprocessor scale (audio 20, depth 5, thermal 10, IMU 5,
text learnable); `config.loss.pairs` lists the modalities bound to images; the total is their mean.
Every pair uses `losses.contrastive.clip_loss`, so all gather modes (auto / all_gather / ring) apply.
The paper's recipe (frozen OpenCLIP image and text towers) is `train.init_from` a CLIP checkpoint
inflated by `inflate_clip` + `optim.groups` freezing `vision/`, `text/` and `text_logit_scale`
(configs/imagebind.py `,from_clip=<dir>`).

Data: `config.data.name` (default the local `digit_modalities`) or `config.data.mixture` of
image-paired datasets that all carry the modalities in `config.model.modalities`. The host pipeline
sends uint8 images (normalised on the host as CLIP does), int16 waveforms, disparity, uint8 thermal and
float16 IMU; the batch transform computes the Kaldi log-mel on the device (data/audio.py).
Evaluator: emergent zero-shot classification of audio / depth / thermal / IMU against text prompts,
image zero-shot, cross-modal retrieval R@1 (instance and same-class), and embedding arithmetic.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colearn_jax import sharding
from colearn_jax.losses import contrastive
from colearn_jax.models import DataContext, System, register
from colearn_jax.models.imagebind import MODALITIES, ImageBind, TowerConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BATCH_KEYS = {"vision": "image", "text": "text", "audio": "audio", "depth": "depth", "thermal": "thermal",
              "imu": "imu"}
PAIRABLE = ("text", "audio", "depth", "thermal", "imu")
THERMAL_MEAN, THERMAL_STD = 0.5, 0.25


# ----------------------------------------------------------------------------- model
def tower_configs(config) -> tuple[TowerConfig, ...]:
    out = []
    for m in config.model.modalities:
        t = dict(config.model.towers[m])
        for key in ("patch", "stride", "input_size"):
            if t.get(key) is not None:
                t[key] = tuple(t[key])
        out.append(TowerConfig(modality=m, **t))
    return tuple(out)


def build_model(config) -> ImageBind:
    m = config.model
    return ImageBind(tower_configs(config), m.embed_dim, scan=m.scan, remat_policy=m.remat_policy,
                     attention_impl=m.get("attention_impl"), dtype=DTYPES[m.dtype])


# ----------------------------------------------------------------------------- objective
def make_objective(config, mesh=None, rules=None):
    axes = sharding.batch_axes(rules) if rules is not None else ("data", "fsdp")
    kw = dict(gather=config.loss.gather, mesh=mesh, batch_axes=axes)
    pairs = tuple(config.loss.pairs)

    def objective(outputs, batch, rngs, step):
        total, metrics = 0.0, {}
        present = [m for m in pairs if f"{m}_embeds" in outputs]
        for m in present:
            loss, met = contrastive.clip_loss(outputs["vision_embeds"], outputs[f"{m}_embeds"],
                                              outputs[f"{m}_log_scale"], mask=batch.get(present_key(m)), **kw)
            total = total + loss
            metrics[f"{m}_loss"] = loss
            metrics[f"{m}_i2m_acc"] = met["i2t_acc"]
        metrics["text_logit_scale"] = jnp.exp(outputs["text_log_scale"]) if "text_log_scale" in outputs else 0.0
        return total / max(len(present), 1), metrics

    return objective


def constrain_params(params):
    """Keeps the learned text log-scale at or below log 100 (the reference clips its exp at 100)."""
    if "text_logit_scale" not in params:
        return params
    return {**params, "text_logit_scale": jnp.clip(params["text_logit_scale"], 0.0, math.log(100.0))}


# ----------------------------------------------------------------------------- partial pairs
def provided_modalities(config, member: dict | None = None) -> list[str]:
    """The modalities a dataset gives: `data.modalities` of the mixture member (or of config.data), or
    all of `model.modalities` when that is empty."""
    listed = (member or {}).get("modalities", config.data.get("modalities")) or []
    return list(listed) or list(config.model.modalities)


def partial_pairs(config) -> list[str]:
    """Pair modalities that some dataset of the run lacks: their rows carry a `present_<m>` flag and the
    loss masks the absent ones (Girdhar et al. 2023 bind through several datasets, each pairing images
    with one modality)."""
    from colearn_jax.data import mixture  # noqa: PLC0415

    members = [o for o, _ in mixture.component_configs(config.data)]
    return [m for m in config.loss.pairs if any(m not in provided_modalities(config, o) for o in members)]


def present_key(modality: str) -> str:
    return f"present_{modality}"


# ----------------------------------------------------------------------------- batches
def example_batch(config, batch_size: int) -> dict:
    """As the host pipeline yields it (before `make_batch_transform`)."""
    # digit_modalities' formats from the modules without TFDS (the train step needs no dataset)
    from colearn_jax.data import audio, modality_io  # noqa: PLC0415

    s, d, t = config.data.image_size, config.data, config.model.towers
    side = {m: tuple(t[m].input_size) for m in ("depth", "thermal") if m in config.model.modalities}
    imu_channels = len(modality_io.IMU_COLUMNS)
    spec = {"image": ((s, s, 3), jnp.float32), "text": ((d.context_length,), jnp.int32),
            "audio": ((int(d.audio_seconds * audio.SAMPLE_RATE),), jnp.int16),
            "depth": (side.get("depth", (s, s)) + (1,), jnp.float32),
            "thermal": (side.get("thermal", (s, s)) + (1,), jnp.uint8),
            "imu": ((imu_channels, d.imu_length), jnp.float16)}
    out = {BATCH_KEYS[m]: jax.ShapeDtypeStruct((batch_size,) + spec[BATCH_KEYS[m]][0], spec[BATCH_KEYS[m]][1])
           for m in config.model.modalities}
    out.update({present_key(m): jax.ShapeDtypeStruct((batch_size,), jnp.bool_) for m in partial_pairs(config)})
    return out


def prepare(config):
    """Host arrays -> model inputs, on device: audio -> normalised log-mel clips, thermal -> float."""
    from colearn_jax.data import audio  # noqa: PLC0415

    d = config.data

    def fn(batch):
        out = dict(batch)
        if "audio" in out:
            wav = audio.int16_to_float(out["audio"])
            out["audio"] = audio.clips_to_melspec(wav, clip_duration=d.audio_clip_seconds, clips=d.audio_clips,
                                                  num_mel_bins=d.audio_mel_bins, target_length=d.audio_target_length)
        if "thermal" in out:
            out["thermal"] = (out["thermal"].astype(jnp.float32) / 255.0 - THERMAL_MEAN) / THERMAL_STD
        if "imu" in out:
            out["imu"] = out["imu"].astype(jnp.float32)
        if "depth" in out:  # disparity standardised per image: the relief, not the distance to the plane
            dep = out["depth"].astype(jnp.float32)
            dep = dep - dep.mean(axis=(1, 2, 3), keepdims=True)
            out["depth"] = dep / (dep.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
        return out

    return fn


def make_batch_transform(config):
    fn = prepare(config)
    return lambda batch, rngs, step: fn(batch)


# ----------------------------------------------------------------------------- data
class _Transform:
    """Raw example -> {image uint8, text ids, audio int16, depth, thermal, imu, label}."""

    def __init__(self, config, tokenizer, provided=None):
        d = config.data
        self.size, self.context_length = int(d.image_size), int(d.context_length)
        self.modalities = list(config.model.modalities)
        provided = set(provided or self.modalities)
        spec = example_batch(config, 1)
        # Modalities this dataset lacks: zeros of the right shape, and present_<m> = False for the loss.
        self.absent = {BATCH_KEYS[m]: np.zeros(spec[BATCH_KEYS[m]].shape[1:], spec[BATCH_KEYS[m]].dtype)
                       for m in self.modalities if m not in provided}
        self.flags = {present_key(m): np.bool_(m in provided) for m in partial_pairs(config)}
        self.modalities = [m for m in self.modalities if m in provided]
        self.tokenizer = tokenizer
        self.text_key, self.label_key = d.text_key, d.get("label_key")
        self.audio_samples = int(d.audio_seconds * 16000)
        self.imu_length = int(d.imu_length)

    def __call__(self, ex, rng=None):
        from colearn_jax.data import image_ops  # noqa: PLC0415
        from colearn_jax.data.pipeline import _pick_text  # noqa: PLC0415

        out = {}
        for m in self.modalities:
            if m == "vision":
                out["image"] = image_ops.resize_short_side_center_crop(np.asarray(ex["image"]), self.size)
            elif m == "text":
                text = _pick_text(ex[self.text_key], rng)
                row = getattr(self.tokenizer, "row", None)
                out["text"] = row(text, self.context_length) if row else self.tokenizer(text, self.context_length)[0]
            elif m == "audio":
                a = np.asarray(ex["audio"], np.int16)[: self.audio_samples]
                out["audio"] = np.pad(a, (0, self.audio_samples - len(a)))
            elif m == "imu":
                x = np.asarray(ex["imu"], np.float16)[:, : self.imu_length]
                out["imu"] = np.pad(x, [(0, 0), (0, self.imu_length - x.shape[1])])
            else:
                out[m] = np.asarray(ex[m])
        out.update({k: v.copy() for k, v in self.absent.items()})
        out.update(self.flags)
        if self.label_key and self.label_key in ex:
            out["label"] = np.int32(ex[self.label_key])
        return out


class _Finish:
    def __call__(self, batch):
        from colearn_jax.data import image_ops  # noqa: PLC0415

        out = dict(batch)
        if "image" in out:
            out["image"] = image_ops.normalize(out["image"])
        if "mask" in out:
            keep = out["mask"]
            out = {k: (np.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, v.dtype.type(0)) if k != "mask" else v)
                   for k, v in out.items()}
        return out


def _tokenizer(config):
    if "text" not in config.model.modalities:
        return None
    from colearn_jax.data import get_tokenizer  # noqa: PLC0415

    return get_tokenizer(config.data.tokenizer, config.data.get("vocab_path"))


def _split_source(data_cfg, split):
    from colearn_jax.data import pipeline  # noqa: PLC0415

    return pipeline._source(data_cfg, split)  # pylint: disable=protected-access


def make_train_data(config, ctx: DataContext):
    import grain  # noqa: PLC0415

    from colearn_jax.data import mixture, pipeline  # noqa: PLC0415

    d = config.data
    per = pipeline._per_process(int(d.batch_size), ctx.process_index, ctx.process_count,  # pylint: disable=protected-access
                                "config.data.batch_size")
    tokenizer = _tokenizer(config)
    parts, weights = [], []
    for i, (overrides, weight) in enumerate(mixture.component_configs(d)):
        cfg = d.copy_and_resolve_references()
        cfg.unlock()
        cfg.update(overrides)
        source = _split_source(cfg, cfg.train_split)
        provided = provided_modalities(config, overrides)
        missing = [BATCH_KEYS[m] for m in provided if BATCH_KEYS[m] not in source[0]
                   and not (m == "text" and cfg.text_key in source[0])]
        if missing:
            raise ValueError(f"config.data{'.mixture[%d]' % i if d.get('mixture') else ''} ({cfg.name}) lacks "
                             f"{missing}, which config.model.modalities needs; list the modalities it does "
                             "give in its `modalities` (the others are then masked out of the loss).")
        transform = _Transform(config, tokenizer, provided)
        parts.append(grain.MapDataset.source(source).seed(ctx.seed + 1000 * (i + 1)).random_map(transform))
        weights.append(weight)
    ds = mixture.mix(parts, weights, seed=ctx.seed)
    ds = ds.batch(per, drop_remainder=True)[ctx.process_index::ctx.process_count].map(_Finish())
    return iter(ds.to_iter_dataset(pipeline._read_options(d)))  # pylint: disable=protected-access


def make_eval_data(config, ctx: DataContext, split=None):
    import math as _m  # noqa: PLC0415

    import grain  # noqa: PLC0415

    from colearn_jax.data import pipeline  # noqa: PLC0415

    d = config.data
    global_b = int(d.eval_batch_size)
    per = pipeline._per_process(global_b, ctx.process_index, ctx.process_count, "config.data.eval_batch_size")  # pylint: disable=protected-access
    source = _split_source(d, split or d.eval_split)
    n = len(source)
    transform = _Transform(config, _tokenizer(config))
    blank = {k: np.zeros_like(v) for k, v in transform(source[0]).items()}
    rows = [k * global_b + ctx.process_index * per + j for k in range(_m.ceil(n / global_b)) for j in range(per)]

    def load(i):
        out = transform(source[i]) if i < n else dict(blank)
        out["mask"] = np.bool_(i < n)
        return out

    ds = grain.MapDataset.source(rows).map(load).batch(per).map(_Finish())
    return iter(ds.to_iter_dataset(pipeline._read_options(d)))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- evaluation
def metric_specs(config) -> dict:
    from colearn_jax.evals import MetricSpec  # noqa: PLC0415

    specs = {}
    for m in config.eval.zeroshot_modalities:
        what = "image" if m == "vision" else m
        specs[f"zeroshot_{what}_top1"] = MetricSpec(
            f"zeroshot_{what}_top1", description=f"{'' if m == 'vision' else 'emergent '}zero-shot top-1 of {what} "
            "against text prompts")
    for a, b in config.eval.retrieval_pairs:
        for q, k in ((a, b), (b, a)):
            specs[f"{q}2{k}_r1"] = MetricSpec(f"{q}2{k}_r1", description=f"{q}->{k} Recall@1 (the paired example)")
            specs[f"{q}2{k}_class_p1"] = MetricSpec(f"{q}2{k}_class_p1",
                                                    description=f"{q}->{k}: top-1 is of the same class")
    for a, b in config.eval.arithmetic_pairs:
        specs[f"{a}+{b}_to_image_top1"] = MetricSpec(
            f"{a}+{b}_to_image_top1", description=f"normalised {a} + {b} embedding retrieves an image of the class")
    return specs


def describe_metrics(config):
    return metric_specs(config)


def _recall1(q, k, labels):
    nearest = np.argmax(q @ k.T, axis=1)
    return float(np.mean(nearest == np.arange(len(q)))), float(np.mean(labels[nearest] == labels))


def compute_metrics(config, embeds: dict, labels: np.ndarray, text_classifiers: dict) -> dict:
    """From unit embeddings {modality: [n, D]} of the eval split and {modality: [classes, D]} prompts."""
    out = {}
    for m in config.eval.zeroshot_modalities:
        if m in embeds and m in text_classifiers:
            pred = np.argmax(embeds[m] @ text_classifiers[m].T, axis=1)
            out[f"zeroshot_{'image' if m == 'vision' else m}_top1"] = float(np.mean(pred == labels))
    for a, b in config.eval.retrieval_pairs:
        if a in embeds and b in embeds:
            for q, k in ((a, b), (b, a)):
                out[f"{q}2{k}_r1"], out[f"{q}2{k}_class_p1"] = _recall1(embeds[q], embeds[k], labels)
    for a, b in config.eval.arithmetic_pairs:
        if a in embeds and b in embeds and "vision" in embeds:
            query = embeds[a] + embeds[b]
            query /= np.linalg.norm(query, axis=1, keepdims=True)
            top = np.argmax(query @ embeds["vision"].T, axis=1)
            out[f"{a}+{b}_to_image_top1"] = float(np.mean(labels[top] == labels))
    return out


def make_evaluator(config, mesh, rules):
    from colearn_jax.evals import DescribedEvaluator  # noqa: PLC0415

    ctx = DataContext(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    bsh = sharding.batch_sharding(mesh, rules)
    dp = sharding.data_parallel_size(mesh, rules)
    rep = sharding.replicated(mesh)
    to_model = prepare(config)
    cache = {}

    def fns(model):
        if id(model) not in cache:
            def embed(variables, batch):
                with nn.logical_axis_rules(rules):
                    out = model.apply(variables, to_model(batch), train=False)
                return {k: v for k, v in out.items() if k.endswith("_embeds")}

            cache[id(model)] = (jax.jit(embed, in_shardings=(None, bsh), out_shardings=rep),
                                jax.jit(lambda x: x, out_shardings=rep))
        return cache[id(model)]

    def evaluate(model, variables):
        embed, gather = fns(model)
        chunks, labels = {}, []
        with jax.set_mesh(mesh):
            for batch in make_eval_data(config, ctx):
                labels_b = batch.pop("label")
                batch = sharding.shard_batch(batch, mesh, rules)
                keep = np.asarray(gather(batch.pop("mask")), bool)
                for k, v in embed(variables, batch).items():
                    chunks.setdefault(k[: -len("_embeds")], []).append(np.asarray(v)[keep])
                labels.append(np.asarray(gather(sharding.shard_batch({"l": labels_b}, mesh, rules)["l"]))[keep])
            embeds = {m: np.concatenate(v) for m, v in chunks.items()}
            classifiers = {}
            if "text" in config.model.modalities:
                tok = _tokenizer(config)
                names = list(config.eval.class_names)
                for m in config.eval.zeroshot_modalities:
                    prompts = [t.format(n) for n in names for t in config.eval.prompts[m]]
                    ids = np.asarray(tok(prompts, config.data.context_length), np.int32)
                    pad = (-len(ids)) % dp
                    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
                    e = np.asarray(embed(variables, {"text": jax.device_put(ids, bsh)})["text_embeds"])[: len(prompts)]
                    e = e.reshape(len(names), len(config.eval.prompts[m]), -1).mean(1)
                    classifiers[m] = e / np.linalg.norm(e, axis=1, keepdims=True)
        return compute_metrics(config, embeds, np.concatenate(labels), classifiers)

    return DescribedEvaluator(evaluate, metric_specs(config))


# ----------------------------------------------------------------------------- CLIP towers
def clip_config_for(config, clip_config):
    """`clip_config` (a CLIP ViT config, unlocked) resized so that its image and text towers, joint width and
    text context are this ImageBind config's: a CLIP trained with it can be copied by `inflate_clip`."""
    towers = dict(zip(config.model.modalities, tower_configs(config)))
    vision, text = towers["vision"], towers["text"]
    if clip_config.model.vision.type != "vit":
        raise ValueError(f"ImageBind's image tower is a ViT; the CLIP config has a {clip_config.model.vision.type!r} one.")
    clip_config.model.embed_dim = config.model.embed_dim
    clip_config.model.vision.update(image_size=vision.input_size[-1], patch_size=vision.patch[-1], width=vision.width,
                                    layers=vision.layers, heads=vision.heads, mlp_ratio=vision.mlp_ratio)
    clip_config.model.text.update(vocab_size=text.vocab_size, context_length=text.context_length, width=text.width,
                                  layers=text.layers, heads=text.heads, mlp_ratio=text.mlp_ratio)
    clip_config.data.update(image_size=config.data.image_size, context_length=text.context_length,
                            tokenizer=config.data.tokenizer, vocab_path=config.data.vocab_path)
    return clip_config


def inflate_clip(clip_path: str, config, output_dir: str, seed: int = 0) -> str:
    """Writes an ImageBind checkpoint whose vision and text towers (and text logit scale) are a CLIP
    checkpoint's (`colearn_jax.load` format), the other towers freshly initialised. The 2-D patch kernel
    K becomes the 3-D [T, p, p, 3, w] kernel K/T per frame: on images repeated to T frames the output
    is unchanged. Then train with `train.init_from=output_dir`, `init_from_map="vision,text,text_logit_scale"`
    and freeze them with `optim.groups`. Returns the checkpoint directory."""
    import colearn_jax  # noqa: PLC0415
    from colearn_jax.convert.writing import save_checkpoint  # noqa: PLC0415

    _, clip_vars, _ = colearn_jax.load(clip_path)
    clip = jax.device_get(clip_vars["params"])
    model = build_model(config)
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(make_batch_transform(config), example_batch(config, 1), {}, 0))
    variables = jax.device_get(nn.unbox(model.init({"params": jax.random.PRNGKey(seed)}, batch)))
    params = dict(variables["params"])
    frames = tower_configs(config)[list(config.model.modalities).index("vision")].patch[0]
    vision = dict(clip["vision"])
    k2 = np.asarray(vision["patch_embed"]["kernel"])
    vision["patch_embed"] = {"kernel": np.repeat(k2[None] / frames, frames, axis=0)}
    params["vision"] = vision
    if "text" in params:
        text = dict(clip["text"])
        text["ln_post"] = text.pop("ln_final")
        text["proj"] = text.pop("text_projection")
        params["text"] = text
        params["text_logit_scale"] = np.asarray(clip["logit_scale"], np.float32)
    return save_checkpoint(config, {**variables, "params": params}, output_dir)


# ----------------------------------------------------------------------------- checks
def validate_config(config) -> None:
    from colearn_jax.config_checks import positive_ints  # noqa: PLC0415

    m, d = config.model, config.data
    if config.loss.gather not in contrastive.GATHER_MODES:
        raise ValueError(f"config.loss.gather={config.loss.gather!r}; choose one of {contrastive.GATHER_MODES}.")
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}; choose one of {sorted(DTYPES)}.")
    mods = list(m.modalities)
    unknown = sorted(set(mods) - set(MODALITIES))
    if unknown or "vision" not in mods:
        raise ValueError(f"config.model.modalities={mods}: needs 'vision' (the binding modality) and only "
                         f"{list(MODALITIES)}.")
    for p in config.loss.pairs:
        if p not in PAIRABLE or p not in mods:
            raise ValueError(f"config.loss.pairs has {p!r}: pairs must be modalities in config.model.modalities "
                             f"other than vision ({[x for x in mods if x != 'vision']}).")
    from colearn_jax.data import mixture  # noqa: PLC0415

    members = [o for o, _ in mixture.component_configs(d)]
    for i, member in enumerate([{}] + members):
        given = provided_modalities(config, member)
        where = "config.data.modalities" if i == 0 else f"config.data.mixture[{i - 1}].modalities"
        if sorted(set(given) - set(mods)) or "vision" not in given:
            raise ValueError(f"{where}={given}: must include 'vision' (every pair is bound through images) and "
                             f"only modalities of config.model.modalities={mods}.")
    never = [p for p in config.loss.pairs if not any(p in provided_modalities(config, o) for o in members)]
    if never:
        raise ValueError(f"config.loss.pairs has {never}, which no dataset of config.data gives (see "
                         "config.data.modalities and its mixture members' `modalities`).")
    positive_ints(config, ("model.embed_dim", "data.image_size", "data.context_length"))
    for mod in mods:
        t = m.towers[mod]
        positive_ints(config, tuple(f"model.towers.{mod}.{k}" for k in ("width", "layers", "heads")))
        if t.width % t.heads:
            raise ValueError(f"config.model.towers.{mod}.width={t.width} is not divisible by heads={t.heads}.")
    v = m.towers.vision
    if tuple(v.input_size) != (d.image_size, d.image_size):
        raise ValueError(f"config.model.towers.vision.input_size={tuple(v.input_size)} differs from "
                         f"config.data.image_size={d.image_size}.")
    if "audio" in mods and tuple(m.towers.audio.input_size) != (d.audio_mel_bins, d.audio_target_length):
        raise ValueError(f"config.model.towers.audio.input_size={tuple(m.towers.audio.input_size)} differs from "
                         f"(config.data.audio_mel_bins, audio_target_length)=({d.audio_mel_bins}, "
                         f"{d.audio_target_length}).")
    if "imu" in mods and m.towers.imu.input_size[1] != d.imu_length:
        raise ValueError(f"config.model.towers.imu.input_size[1]={m.towers.imu.input_size[1]} differs from "
                         f"config.data.imu_length={d.imu_length}.")
    if "text" in mods and m.towers.text.context_length < d.context_length:
        raise ValueError(f"config.data.context_length={d.context_length} exceeds "
                         f"config.model.towers.text.context_length={m.towers.text.context_length}.")


@register("imagebind")
def imagebind_system() -> System:
    return System(
        name="imagebind",
        build_model=build_model,
        make_objective=make_objective,
        example_batch=example_batch,
        make_train_data=make_train_data,
        make_eval_data=make_eval_data,
        make_evaluator=make_evaluator,
        describe_metrics=describe_metrics,
        validate_config=validate_config,
        rng_streams=("dropout",),
        make_batch_transform=make_batch_transform,
        constrain_params=constrain_params,
        resume_free_keys=("data.data_dir", "data.vocab_path", "data.eval_split", "model.remat_policy",
                          "model.attention_impl"),
    )
