"""Convert a public CLIP (or open_clip CoCa) checkpoint into a colearn_jax checkpoint directory.

    python -m colearn_jax.convert --source=openai --input=ViT-B-32.pt --output=/tmp/clip_b32
    python -m colearn_jax.convert --source=open_clip --input=model.safetensors --model_config=ViT-B-16.json \
        --output=/tmp/clip_b16 [--scan]
    python -m colearn_jax.convert --source=hf --input=/path/to/hf_clip_dir --output=/tmp/hf_clip
    python -m colearn_jax.convert --source=open_clip --input=coca.safetensors --model_config=coca_ViT-B-32.json \
        --output=/tmp/coca_b32          # an open_clip CoCa (text_decoder.* keys) -> colearn_jax's CoCa

The output loads with `model, variables, config = colearn_jax.load(OUTPUT)`.
"""
from __future__ import annotations

import argparse
import sys

from colearn_jax.convert.clip import SOURCES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m colearn_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES, help="checkpoint family")
    p.add_argument("--input", required=True, help="checkpoint file, or the Hugging Face model directory")
    p.add_argument("--output", required=True, help="colearn_jax workdir to write (checkpoints/ inside)")
    p.add_argument("--model_config", default=None,
                   help="open_clip model-config JSON (embed_dim, vision_cfg, text_cfg); hf: defaults to "
                        "<input>/config.json")
    p.add_argument("--scan", action="store_true", help="stack layers for config.model.scan=True")
    p.add_argument("--vision_heads", type=int, default=None, help="override the image tower's head count")
    p.add_argument("--text_heads", type=int, default=None, help="override the text tower's head count")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from colearn_jax.convert.clip import ConversionError, convert, describe, save_checkpoint  # noqa: PLC0415
    from colearn_jax.convert.torch_reader import CheckpointFormatError  # noqa: PLC0415

    try:
        config, variables = convert(
            args.source, args.input, model_config=args.model_config, scan=args.scan,
            vision_heads=args.vision_heads, text_heads=args.text_heads,
        )
        directory = save_checkpoint(config, variables, args.output)
    except (FileNotFoundError, FileExistsError, ConversionError, CheckpointFormatError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Converted {args.source} checkpoint {args.input}: {describe(config)}")
    print(f"Wrote {directory}; load with colearn_jax.load({args.output!r}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
