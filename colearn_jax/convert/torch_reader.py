"""Read PyTorch-world checkpoint files into flat `{name: np.ndarray}` dicts (float32 where floating).

Formats:
  * `.safetensors` (one file, or a Hugging Face directory with `model.safetensors` or a sharded
    `model.safetensors.index.json`): read with the `safetensors` package's numpy API; torch is not
    needed. bfloat16 tensors (numpy has no such dtype) are decoded from the raw bytes.
  * `.bin` / `.pt` / `.pth` pickled state dicts (and training checkpoints holding one under
    `state_dict` / `model`, with DDP's `module.` or torch.compile's `_orig_mod.` prefixes): need torch.
  * TorchScript archives (OpenAI's released CLIP `.pt` files): need torch
    (`torch.jit.load(path, map_location="cpu").state_dict()`).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class CheckpointFormatError(ValueError):
    """A checkpoint file exists but cannot be read as the format it claims to be."""


def _require_torch(path: str, what: str):
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"Reading {path!r} ({what}) needs PyTorch, which is not installed. Install it "
            "(`pip install torch`) or convert the weights to .safetensors first, which needs no torch."
        ) from e
    return torch


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor / numpy array -> numpy; floating types become float32."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
        x = x.astype(np.float32)
    return x


def _bf16_tensors_raw(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """bfloat16 tensors of a safetensors file, decoded from the raw little-endian bytes."""
    out = {}
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name in names:
            info = header[name]
            if info["dtype"] != "BF16":
                raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2").astype(np.uint32) << 16
            out[name] = raw.view(np.float32).reshape(info["shape"])
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"Reading {path!r} needs the `safetensors` package (`pip install safetensors`)."
        ) from e
    out: dict[str, np.ndarray] = {}
    bf16: list[str] = []
    try:
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                try:
                    out[name] = to_numpy(f.get_tensor(name))
                except TypeError:  # bfloat16: numpy has no such dtype
                    bf16.append(name)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers / data
        if isinstance(e, (CheckpointFormatError, ImportError)):
            raise
        raise CheckpointFormatError(
            f"{path} is not a valid safetensors file ({type(e).__name__}: {e})."
        ) from e
    if bf16:
        out.update(_bf16_tensors_raw(path, bf16))
    return out


def is_torchscript_archive(path: str) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` / `code/` entry."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def unwrap_state_dict(obj: Any, path: str = "<checkpoint>") -> dict[str, Any]:
    """The parameter dict of a raw state dict or of a training checkpoint wrapping one."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a whole nn.Module was pickled
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and not any(hasattr(v, "shape") for v in obj.values()):
            obj = inner
            break
    sd = dict(obj)
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """A pickled state dict (`torch.save`) or a TorchScript archive, via torch."""
    if is_torchscript_archive(path):
        torch = _require_torch(path, "a TorchScript archive")
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointFormatError(f"{path} could not be loaded as TorchScript ({type(e).__name__}: {e}).") from e
    else:
        torch = _require_torch(path, "a pickled PyTorch state dict")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointFormatError(
                f"{path} could not be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
                "It must be a state dict saved with torch.save (or a TorchScript archive)."
            ) from e
        sd = unwrap_state_dict(obj, path)
    return {k: to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def _hf_weight_files(directory: str) -> list[str]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        single_path = os.path.join(directory, single)
        if os.path.isfile(single_path):
            return [single_path]
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
    raise FileNotFoundError(
        f"No weights in {directory}: expected model.safetensors, pytorch_model.bin or a sharded "
        "*.index.json next to config.json."
    )


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Flat `{name: array}` from a file or a Hugging Face model directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if os.path.isdir(path):
        sd: dict[str, np.ndarray] = {}
        for f in _hf_weight_files(path):
            sd.update(read_state_dict(f))
        return sd
    if path.endswith(SAFETENSORS_SUFFIXES):
        return read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not zipfile.is_zipfile(path) and len(head) == 8:
        # Not a zip (torch.save's format since 1.6) - maybe a safetensors file without the suffix.
        (n,) = struct.unpack("<Q", head)
        if 2 <= n < os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(8)
                if f.read(1) == b"{":
                    return read_safetensors(path)
    return read_torch_file(path)
