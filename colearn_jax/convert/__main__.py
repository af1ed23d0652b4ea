"""Convert a public checkpoint (CLIP, an open_clip CoCa, a torchvision-layout ResNet, or ImageBind) into a
colearn_jax checkpoint directory.

    python -m colearn_jax.convert --source=openai --input=ViT-B-32.pt --output=/tmp/clip_b32
    python -m colearn_jax.convert --source=open_clip --input=model.safetensors --model_config=ViT-B-16.json \
        --output=/tmp/clip_b16 [--scan]
    python -m colearn_jax.convert --source=hf --input=/path/to/hf_clip_dir --output=/tmp/hf_clip
    python -m colearn_jax.convert --source=open_clip --input=coca.safetensors --model_config=coca_ViT-B-32.json \
        --output=/tmp/coca_b32          # an open_clip CoCa (text_decoder.* keys) -> colearn_jax's CoCa
    python -m colearn_jax.convert --source=torchvision_resnet --input=resnet50.pth --output=/tmp/r50 \
        [--with_classifier] [--prefix=encoder.] [--image_size=224]
    python -m colearn_jax.convert --source=imagebind --input=imagebind_huge.pth --output=/tmp/imagebind_huge \
        [--scan] [--heads=vision:16,text:16,...] [--audio_stride=10]   # facebookresearch/ImageBind layout

The output loads with `model, variables, config = colearn_jax.load(OUTPUT)`.
"""
from __future__ import annotations

import argparse
import sys

from colearn_jax.convert.clip import SOURCES as CLIP_SOURCES

RESNET_SOURCES = ("torchvision_resnet",)
IMAGEBIND_SOURCES = ("imagebind",)
SOURCES = CLIP_SOURCES + RESNET_SOURCES + IMAGEBIND_SOURCES


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
    p.add_argument("--with_classifier", action="store_true",
                   help="torchvision_resnet: keep `fc` as the classifier (system simclr_finetune); default: drop it")
    p.add_argument("--prefix", default=None, help="torchvision_resnet: key prefix of the ResNet (default: found)")
    p.add_argument("--image_size", type=int, default=None, help="torchvision_resnet: config.data.image_size")
    p.add_argument("--heads", default=None,
                   help="imagebind: head counts per modality, e.g. vision:16,text:16 (default: the released "
                        "imagebind_huge counts where a tower has the released width)")
    p.add_argument("--audio_stride", type=int, default=10, help="imagebind: the audio stem's stride (released: 10)")
    p.add_argument("--audio_mel_bins", type=int, default=128, help="imagebind: log-mel bins (released: 128)")
    p.add_argument("--audio_frames", type=int, default=204, help="imagebind: log-mel frames (released: 204)")
    return p.parse_args(argv)


def _convert_resnet(args):
    from colearn_jax.convert import resnet_v1  # noqa: PLC0415
    from colearn_jax.convert.torch_reader import read_state_dict  # noqa: PLC0415

    sd = read_state_dict(args.input)
    prefix = resnet_v1.find_prefix(sd, args.prefix)
    dropped = resnet_v1.dropped_keys(sd, prefix)
    if dropped:
        print(f"Dropped {len(dropped)} keys outside the ResNet (prefix {prefix!r}): {dropped[:8]}"
              f"{' ...' if len(dropped) > 8 else ''}")
    config, variables = resnet_v1.convert_state_dict(sd, with_classifier=args.with_classifier, prefix=prefix,
                                                     image_size=args.image_size)
    return config, variables, resnet_v1.describe(config)


def _convert_imagebind(args):
    from colearn_jax.convert import imagebind  # noqa: PLC0415
    from colearn_jax.convert.torch_reader import read_state_dict  # noqa: PLC0415

    heads = imagebind.parse_heads(args.heads)
    for name, n in (("vision", args.vision_heads), ("text", args.text_heads)):
        if n is not None:
            heads[name] = n
    config, variables = imagebind.convert_state_dict(
        read_state_dict(args.input), heads, scan=args.scan, audio_stride=args.audio_stride,
        audio_mel_bins=args.audio_mel_bins, audio_frames=args.audio_frames)
    return config, variables, imagebind.describe(config)


def main(argv=None) -> int:
    args = parse_args(argv)
    from colearn_jax.convert.clip import ConversionError, convert, describe, save_checkpoint  # noqa: PLC0415
    from colearn_jax.convert.torch_reader import CheckpointFormatError  # noqa: PLC0415

    try:
        if args.source in RESNET_SOURCES:
            config, variables, description = _convert_resnet(args)
        elif args.source in IMAGEBIND_SOURCES:
            config, variables, description = _convert_imagebind(args)
        else:
            config, variables = convert(
                args.source, args.input, model_config=args.model_config, scan=args.scan,
                vision_heads=args.vision_heads, text_heads=args.text_heads,
            )
            description = describe(config)
        directory = save_checkpoint(config, variables, args.output)
    except (FileNotFoundError, FileExistsError, ConversionError, CheckpointFormatError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Converted {args.source} checkpoint {args.input}: {description}")
    print(f"Wrote {directory}; load with colearn_jax.load({args.output!r}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
