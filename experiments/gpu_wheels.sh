#!/usr/bin/env bash
# (Re)downloads into .whl/ (git-ignored) exactly the wheels experiments/gpu_suite.sh installs on the
# GPU machine, whose image (Python 3.12; jax, flax, optax, orbax, chex, torch, torchvision, timm,
# regex, tqdm, huggingface_hub, safetensors, absl-py, PyYAML) lacks these four:
#   ml_collections   configs (needs absl-py, PyYAML: in the image)
#   open_clip_torch  the open_clip side (needs torch, torchvision, regex, ftfy, tqdm, huggingface-hub,
#                    safetensors, timm: all in the image but ftfy)
#   ftfy, wcwidth    open_clip's text cleaning (ftfy needs wcwidth)
# All four are pure-Python wheels (about 1.8 MB together). The versions are the ones this project
# tests with; keep one version of each (two stop the install).
# Into .whl/transformers4/ go the three that open_clip's CoCa `generate` needs beside them (the image has
# transformers 5; colearn_jax/open_clip_env.py): transformers 4.55.4, tokenizers 0.21.4 (a binary
# wheel) and huggingface-hub 0.36.0, about 15 MB; the suite installs them into a directory of their
# own, named by $COLEARN_TRANSFORMERS4_PATH, which only the decoding benchmark's worker puts on its path.
# Run from anywhere:
#
#   bash experiments/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(ml_collections==1.1.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0)
TRANSFORMERS4=(transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.36.0)  # = open_clip_env.TRANSFORMERS4

download() {  # folder wheel...
  local dir=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@"
}

rm -rf .whl
mkdir -p .whl/transformers4
download .whl "${WHEELS[@]}"
download .whl/transformers4 "${TRANSFORMERS4[@]}"
ls -l .whl .whl/transformers4
echo "total: $(du -sh .whl | cut -f1) in $(ls .whl/*.whl .whl/transformers4/*.whl | wc -l) wheels"
