"""Weighted mixtures of several datasets in one training stream.

ImageBind (Girdhar et al. 2023, Sec. 3.2) binds each modality to images through several image-paired
datasets at once; CLIP-style runs mix caption sets the same way. `mix` takes per-dataset grain
`MapDataset`s of already-transformed examples (same feature spec), shuffles each with its own seed,
repeats each forever and interleaves them in proportion to the weights (`grain.MapDataset.mix`:
exact proportions), then optionally reshuffles the mixture so a dataset's rows do not sit at fixed
batch positions. Everything stays a `MapDataset`, so the iterator built from it is checkpointable
(`get_state`/`set_state`, Orbax `grain.checkpoint`) like the single-dataset pipeline.

Config form (`config.data.mixture`): a list of `{"weight": w, ...fields overriding config.data}`,
e.g. `[{"name": "digits_captions", "weight": 3}, {"name": "coco_captions", "weight": 1,
"text_key": "captions/text"}]`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # grain loads in `mix` only: config checks read `component_configs` without it
    import grain


def normalized_weights(weights: Sequence[float], key: str = "config.data.mixture") -> list[float]:
    weights = [float(w) for w in weights]
    if not weights:
        raise ValueError(f"{key} is empty; give at least one dataset.")
    for i, w in enumerate(weights):
        if not w > 0:
            raise ValueError(f"{key}[{i}].weight={w} must be > 0.")
    total = sum(weights)
    return [w / total for w in weights]


def mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float], *, seed: int,
        reshuffle: bool = True) -> grain.MapDataset:
    """An endless weighted mixture of `datasets` (each shuffled with seed + i and repeated)."""
    import grain  # noqa: PLC0415

    weights = normalized_weights(weights)
    if len(weights) != len(datasets):
        raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights in the mixture.")
    parts = [ds.seed(seed + 1 + i).shuffle().repeat() for i, ds in enumerate(datasets)]
    mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
    return mixed.seed(seed).shuffle() if reshuffle and len(parts) > 1 else mixed


def component_configs(data_cfg) -> list[tuple[dict, float]]:
    """[(overrides, weight)] from `data_cfg.mixture` (empty or absent: the single dataset itself)."""
    mixture = list(data_cfg.get("mixture") or ())
    if not mixture:
        return [({}, 1.0)]
    out = []
    for i, item in enumerate(mixture):
        item = dict(item)
        if "weight" not in item:
            raise ValueError(f"config.data.mixture[{i}]={item} needs a 'weight'.")
        unknown = set(item) - {"weight"} - set(data_cfg.keys())
        if unknown:
            raise ValueError(f"config.data.mixture[{i}] has keys {sorted(unknown)} that config.data does not have.")
        weight = item.pop("weight")
        out.append((item, weight))
    normalized_weights([w for _, w in out])
    return out
