"""Pretrained initialisation: `config.train.init_from` (+ `init_from_map`) into a fresh train state.

The source is any directory this project wrote — a training workdir, its `checkpoints/` or `best/`, or
a converter's output — and only its `model` item (parameters + model state) is read. Leaves are
restored straight into the target's sharded layout (Orbax partial restore with the target's
shardings), so no host holds the whole model. The map `"src:dst,src2:dst2"` (`"src"` alone keeps
the name) loads subtrees, e.g. a CLIP's `vision` into another system's image tower; an empty map
loads the whole tree, which must then match exactly. A mismatch raises one error listing the
missing, unexpected and shape-mismatched keys.
"""
from __future__ import annotations

import jax
from flax import traverse_util

from colearn_jax.train.checkpoint import Checkpointer, checkpoint_dir, pick_step
from colearn_jax.train.optimizer import path_str

MAX_LISTED = 12


class InitFromError(ValueError):
    pass


def parse_map(spec: str) -> list[tuple[str, str]]:
    pairs = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        src, _, dst = item.partition(":")
        src, dst = src.strip().strip("/"), (dst.strip().strip("/") or src.strip().strip("/"))
        if not src:
            raise InitFromError(f"config.train.init_from_map={spec!r}: empty source in {item!r}.")
        pairs.append((src, dst))
    return pairs


def _flat(tree) -> dict:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


def _listing(title: str, keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:MAX_LISTED]) + more


def plan(source: dict, target: dict, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """{target key: source key} for the leaves to load; raises InitFromError on any mismatch.

    Keys are "collection/path" ("params/vision/proj"); a map applies inside every collection.
    """
    collections = sorted({k.split("/", 1)[0] for k in target} | {k.split("/", 1)[0] for k in source})
    if not pairs:
        wanted = {k: k for k in target}
        unexpected = set(source) - set(target)
        src_prefixes = []
    else:
        wanted, src_prefixes = {}, []
        for src, dst in pairs:
            matched = False
            for c in collections:
                sp, dp = f"{c}/{src}", f"{c}/{dst}"
                src_prefixes.append((sp, dp))
                for k in target:
                    if _under(k, dp):
                        wanted[k] = sp + k[len(dp):]
                        matched = True
            if not matched:
                tops = sorted({k.split("/")[1] for k in target if k.startswith("params/")})
                raise InitFromError(f"config.train.init_from_map: the model has no subtree {dst!r}; its top-level "
                                    f"parameters are {tops}.")
            if not any(_under(k, f"{c}/{src}") for c in collections for k in source):
                tops = sorted({k.split("/")[1] for k in source if k.startswith("params/")})
                raise InitFromError(f"config.train.init_from_map: the checkpoint has no subtree {src!r}; its top-level "
                                    f"parameters are {tops}.")
        used = set(wanted.values())
        unexpected = {k for k in source for sp, _ in src_prefixes if _under(k, sp) and k not in used}
    missing = {t for t, s in wanted.items() if s not in source}
    mismatched = {
        f"{t} (checkpoint {tuple(source[s].shape)} vs model {tuple(target[t].shape)})"
        for t, s in wanted.items() if s in source and tuple(source[s].shape) != tuple(target[t].shape)
    }
    if missing or unexpected or mismatched:
        msg = "the checkpoint does not match the model:"
        if missing:
            msg += _listing("missing from the checkpoint", missing)
        if unexpected:
            msg += _listing("unexpected (in the checkpoint, not in the model)", unexpected)
        if mismatched:
            msg += _listing("shape mismatch", mismatched)
        raise InitFromError(msg)
    return wanted


def restore_pretrained(path: str, abstract_variables: dict, map_spec: str = "", step: int | None = None
                       ) -> tuple[dict, int, str]:
    """Reads the mapped leaves of `path` into the layout of `abstract_variables` (ShapeDtypeStructs
    with shardings). Returns ({target key: array}, source step, source directory)."""
    directory = checkpoint_dir(path)
    pairs = parse_map(map_spec)
    with Checkpointer(directory, read_only=True, async_save=False) as ckpt:
        step = pick_step(ckpt, step)
        source = _flat(ckpt.variables_metadata(step))
        target = _flat(abstract_variables)
        try:
            wanted = plan(source, target, pairs)
        except InitFromError as e:
            raise InitFromError(f"config.train.init_from={path!r} (step {step}): {e}") from None
        request = traverse_util.unflatten_dict(
            {tuple(s.split("/")): target[t] for t, s in wanted.items()})
        restored = _flat(ckpt.restore_variables(step, request, partial=True))
    return {t: restored[s] for t, s in wanted.items()}, step, directory


def apply_pretrained(variables: dict, loaded: dict) -> dict:
    """`variables` with the leaves named in `loaded` ({"params/a/b": array}) replaced."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    for key, value in loaded.items():
        if value.dtype != flat[key].dtype:
            value = value.astype(flat[key].dtype)
        flat[key] = value
    return traverse_util.unflatten_dict(flat, sep="/")
