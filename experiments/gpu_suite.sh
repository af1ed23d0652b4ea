#!/usr/bin/env bash
# GPU benchmark suite on one GPU (H100 or H200), in under 8 minutes; two cell sets (GPU_SUITE_SET):
#
#   clip (default)  CLIP ViT-B/16 and ViT-B/32 bf16 train steps: colearn_jax (experiments/benchmark.py:
#                   step time, examples/s, MFU, memory) with XLA vs cuDNN attention and remat none vs
#                   dots, and open_clip's same step (experiments/compare_open_clip.py --sides=open_clip,
#                   torch autocast bf16), global batch 256 (RESULTS.md §6).
#   systems         the other systems, most important first: CoCa base (ViT-B/32, open_clip's coca_ViT-B-32
#                   sizes) bf16 train step at batch 256, cuDNN attention + remat dots (XLA attention only if
#                   that fails); SimCLR ResNet-50 (resnet50_imagenet) bf16 at batch 256 (512 views);
#                   ImageBind huge bf16 at batch 128, cuDNN + dots (XLA fallback likewise); CoCa base
#                   decoding (experiments/coca_decoding.py --device=cuda: KV-cached vs uncached vs
#                   open_clip's generate, batch 8, 30 tokens); and the three CPU demos' steps at their
#                   presets' batch and float32 (coca scenes_tagged 64, simclr digit_scenes 128, imagebind
#                   digits 64), i.e. how fast the local demos would train on a GPU. Train steps run on
#                   synthetic batches (no dataset, no TFDS / grain). Expected on an H200: ~350-400 s.
#
# Device calls (the GPU image lacks ml_collections and open_clip_torch, and has transformers 5, which
# open_clip's CoCa generate cannot use; prepare the wheels once here with `bash experiments/gpu_wheels.sh`,
# which fills the git-ignored .whl/):
#
#   run(command="GPU_SUITE_COMMIT=<git rev-parse --short HEAD here> bash experiments/gpu_suite.sh",
#       carry=[".whl"], timeout_s=540)
#   run(command="GPU_SUITE_SET=systems GPU_SUITE_COMMIT=<...> bash experiments/gpu_suite.sh",
#       carry=[".whl"], timeout_s=540)
#
# (Name the commit: on 2026-11-28 the device's copy of .git reported the session's starting commit, not
# the one committed since, so the table must be told.)
#
# What comes back in $OUT (4 files): gpu_table.md (the section to append to experiments/RESULTS.md),
# gpu_results.json (every cell: metrics or the reason it has none), gpu_suite.log (this script's
# output) and gpu_suite.tar.gz (per-cell JSONs and logs, cells.tsv, meta.json, nvidia-smi).
# Without $OUT they go to $GPU_SUITE_OUT (default ./gpu_suite_out, git-ignored).
#
# Memory: ViT-B/16 at batch 256 without remat is the tight CLIP cell. XLA:CPU plans 85 GiB for it (36
# GiB with remat `dots`; `benchmark.py --compile_only`); on the H200 it took 44.5 GiB (12.7 with dots).
# If a cell does not fit, it reads "n/a (... RESOURCE_EXHAUSTED ...)". Systems set, XLA:CPU bf16 plans
# (upper bounds: XLA:CPU keeps f32 copies): CoCa base 256 + dots 41.6 GiB, ImageBind huge 128 + dots
# 79.9 GiB, SimCLR ResNet-50 256 images ~72 GiB (145 GiB at 512, hence 256).
#
# Robustness: every cell is its own process under `timeout`, with its own log; a cell that fails,
# runs out of memory or times out reads "n/a (reason)" in the table and the next cell runs. A cell
# may name another as the one it stands in for: it runs only where that one did not succeed. The
# cells run most important first; once the wall budget (GPU_SUITE_BUDGET_S, default 450 s from the
# start) leaves less than GPU_SUITE_MIN_CELL_S (default 40 s), the remaining cells are skipped, and
# the table is written whatever happened.
#
# CPU dry runs of the whole pipeline (the cuDNN cell fails there by design and shows the n/a path):
#
#   GPU_SUITE_SMOKE=1 bash experiments/gpu_suite.sh                      # configs/clip.py:tiny, batch 32,
#                                                                        # open_clip alike; a minute or two
#   GPU_SUITE_SMOKE=1 GPU_SUITE_SET=systems bash experiments/gpu_suite.sh  # the tiny presets; ~4 minutes
#
# Other knobs: GPU_SUITE_CELLS (comma-separated cell names to run; default all), GPU_SUITE_STEPS
# (timed steps, default 20), GPU_SUITE_CELL_TIMEOUT_S (default 150; systems 200), GPU_SUITE_SITE
# (wheel target, default /tmp/site), GPU_SUITE_KEEP_WORK=1 (keep the work directory), GPU_SUITE_COMMIT
# (the commit named in the table, where the copy has no .git), PYTHON (default python3).
set -u

cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
SMOKE=${GPU_SUITE_SMOKE:-0}
SET=${GPU_SUITE_SET:-clip}
case $SET in clip | systems) ;; *) echo "GPU_SUITE_SET=$SET: choose clip or systems"; exit 2 ;; esac
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
DEST=${OUT:-${GPU_SUITE_OUT:-gpu_suite_out}}
mkdir -p "$WORK/logs" "$DEST"
exec > >(tee "$WORK/gpu_suite.log") 2>&1

# ----------------------------------------------------------------------------- wheels
SITE=${GPU_SUITE_SITE:-$([ "$SMOKE" = 1 ] && echo "$WORK/site" || echo /tmp/site)}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "WARNING: installing .whl/*.whl failed; cells that need ml_collections or open_clip will fail"
else
  echo "WARNING: no .whl/*.whl (run experiments/gpu_wheels.sh here first); using the installed packages"
fi
# transformers 4 for open_clip's CoCa generate, in the decoding cell's worker only (open_clip_env.py)
T4_SITE=${SITE}_transformers4
if [ "$SET" = systems ] && compgen -G ".whl/transformers4/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$T4_SITE" \
    .whl/transformers4/*.whl && export COLEARN_TRANSFORMERS4_PATH="$T4_SITE" \
    || echo "WARNING: installing .whl/transformers4/*.whl failed; open_clip's CoCa generate may fail"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

# ----------------------------------------------------------------------------- settings
BUDGET_S=${GPU_SUITE_BUDGET_S:-450}
MIN_CELL_S=${GPU_SUITE_MIN_CELL_S:-40}
CELL_TIMEOUT_S=${GPU_SUITE_CELL_TIMEOUT_S:-$([ "$SET" = systems ] && echo 200 || echo 150)}
STEPS=${GPU_SUITE_STEPS:-20}
WARMUP=5
REPEATS=5  # coca_decoding.py's timed rounds
TORCH_DEVICE=cuda
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  STEPS=${GPU_SUITE_STEPS:-2}; WARMUP=1; REPEATS=2
  TORCH_DEVICE=cpu
fi
# One line per cell: name | side | model | attention | remat | batch [| dtype | fallback for]
#   colearn_jax   experiments/benchmark.py's train step; model: a configs/clip.py preset or <system>:<preset>
#                 (configs/<system>.py); attention xla | cudnn; remat a remat_policy, "-" where the
#                 config has none (SimCLR)
#   open_clip     experiments/compare_open_clip.py --sides=open_clip; model: its --arch
#   decoding      experiments/coca_decoding.py; model: its --size; batch: its --batch_size
#   dtype         config.model.dtype (default bfloat16)
#   fallback for  runs only where the named cell did not succeed (XLA attention where cuDNN's failed)
# Most important first: the budget guard drops cells from the end.
case "$SET/$([ "$SMOKE" = 1 ] && echo smoke || echo gpu)" in
  clip/smoke) ALL_CELLS="tiny_xla_none|colearn_jax|tiny|xla|none|32
tiny_open_clip|open_clip|tiny|torch|none|32
tiny_cudnn_none|colearn_jax|tiny|cudnn|none|32
tiny_xla_dots|colearn_jax|tiny|xla|dots|32" ;;
  clip/gpu) ALL_CELLS="b16_cudnn_none|colearn_jax|vit_b16|cudnn|none|256
b16_xla_none|colearn_jax|vit_b16|xla|none|256
b16_open_clip|open_clip|vit_b16|torch|none|256
b32_cudnn_none|colearn_jax|vit_b32|cudnn|none|256
b32_xla_none|colearn_jax|vit_b32|xla|none|256
b32_open_clip|open_clip|vit_b32|torch|none|256
b16_cudnn_dots|colearn_jax|vit_b16|cudnn|dots|256
b32_cudnn_dots|colearn_jax|vit_b32|cudnn|dots|256
b16_xla_dots|colearn_jax|vit_b16|xla|dots|256
b32_xla_dots|colearn_jax|vit_b32|xla|dots|256" ;;
  # The tiny presets on the CPU; the cuDNN cell fails there by design, so its fallback runs.
  systems/smoke) ALL_CELLS="coca_tiny|colearn_jax|coca:tiny|cudnn|dots|16
coca_tiny_xla|colearn_jax|coca:tiny|xla|dots|16||coca_tiny
simclr_tiny|colearn_jax|simclr:tiny|-|-|16
imagebind_tiny|colearn_jax|imagebind:tiny|xla|dots|8
coca_decoding_tiny|decoding|tiny|-|-|2|float32
coca_tiny_f32|colearn_jax|coca:tiny|xla|none|32|float32
simclr_tiny_f32|colearn_jax|simclr:tiny|-|-|16|float32
imagebind_tiny_f32|colearn_jax|imagebind:tiny|xla|none|32|float32" ;;
  # SimCLR at 256 images = 512 views (XLA:CPU plans 145 GiB for 512); ImageBind huge at 128 (image and
  # text towers frozen, as in the preset); then the three CPU demos' steps at their presets' batch and dtype.
  systems/gpu) ALL_CELLS="coca_base|colearn_jax|coca:base|cudnn|dots|256
coca_base_xla|colearn_jax|coca:base|xla|dots|256||coca_base
simclr_r50|colearn_jax|simclr:resnet50_imagenet|-|-|256
imagebind_huge|colearn_jax|imagebind:huge|cudnn|dots|128
imagebind_huge_xla|colearn_jax|imagebind:huge|xla|dots|128||imagebind_huge
coca_decoding|decoding|base|-|-|8|float32
coca_scenes_tagged|colearn_jax|coca:scenes_tagged|xla|none|64|float32
simclr_digit_scenes|colearn_jax|simclr:digit_scenes|-|-|128|float32
imagebind_digits|colearn_jax|imagebind:digits|xla|none|64|float32" ;;
esac

elapsed() { echo $(( $(date +%s) - START )); }

# ----------------------------------------------------------------------------- one cell
cell_command() {  # side model attention remat batch dtype json -> the command line, one word per line
  local side=$1 model=$2 attention=$3 remat=$4 batch=$5 dtype=$6 json=$7
  case $side in
    colearn_jax)
      local config=configs/clip.py:$model
      [[ $model == *:* ]] && config=configs/${model%%:*}.py:${model#*:}
      printf '%s\n' "$PY" experiments/benchmark.py "--config=$config" "--batch_size=$batch" \
        "--config.model.dtype=$dtype"
      [ "$remat" = - ] || echo "--config.model.remat_policy=$remat"
      printf '%s\n' "--steps=$STEPS" "--warmup=$WARMUP" "--out=$json"
      [ "$attention" = cudnn ] && echo --config.model.attention_impl=cudnn ;;
    open_clip)
      local context=77
      [ "$model" = tiny ] && context=24
      printf '%s\n' "$PY" experiments/compare_open_clip.py --sides=open_clip "--device=$TORCH_DEVICE" \
        --dtype=bfloat16 "--arch=$model" "--batch_size=$batch" "--context_length=$context" \
        --rounds=4 "--steps_per_round=$(( (STEPS + 3) / 4 ))" "--warmup=$WARMUP" "--out=$json" ;;
    decoding)
      printf '%s\n' "$PY" experiments/coca_decoding.py "--size=$model" "--batch_size=$batch" \
        "--device=$TORCH_DEVICE" "--repeats=$REPEATS" "--out=$json" ;;
  esac
  return 0
}

record() {  # name side model attention remat batch dtype rc seconds status note
  local IFS=$'\t'
  echo "$*" >>"$WORK/cells.tsv"
}

declare -A STATUS  # cell name -> its status, for the fallbacks

run_cell() {  # one line of ALL_CELLS
  local name side model attention remat batch dtype fallback_for
  IFS='|' read -r name side model attention remat batch dtype fallback_for <<<"$1"
  dtype=${dtype:-bfloat16}
  if [ -n "$fallback_for" ] && [ "${STATUS[$fallback_for]:-}" = ok ]; then
    echo "[$(elapsed) s] $name: not needed ($fallback_for succeeded)"
    return
  fi
  local left=$(( BUDGET_S - $(elapsed) ))
  if [ "$left" -lt "$MIN_CELL_S" ]; then
    echo "[$(elapsed) s] $name: skipped (${left} s of the ${BUDGET_S} s budget left)"
    record "$name" "$side" "$model" "$attention" "$remat" "$batch" "$dtype" "" 0 skipped \
      "suite budget spent: ${left} s of ${BUDGET_S} s left"
    return
  fi
  local limit=$(( CELL_TIMEOUT_S < left ? CELL_TIMEOUT_S : left ))
  local cmd
  mapfile -t cmd < <(cell_command "$side" "$model" "$attention" "$remat" "$batch" "$dtype" "$WORK/$name.json")
  echo "[$(elapsed) s] $name (limit ${limit} s): ${cmd[*]}"
  local t0=$(date +%s)
  # JAX preallocates 75 % of the GPU by default; let a colearn cell use up to 90 %.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout --kill-after=10 "$limit" "${cmd[@]}" >"$WORK/logs/$name.log" 2>&1
  local rc=$? seconds=$(( $(date +%s) - t0 )) status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout
  elif [ "$rc" != 0 ] || [ ! -s "$WORK/$name.json" ]; then status=failed; fi
  echo "[$(elapsed) s] $name: $status (rc $rc, ${seconds} s)"
  [ "$status" = ok ] || tail -n 3 "$WORK/logs/$name.log" | sed 's/^/    /'
  STATUS[$name]=$status
  record "$name" "$side" "$model" "$attention" "$remat" "$batch" "$dtype" "$rc" "$seconds" "$status" ""
}

# ----------------------------------------------------------------------------- the run
printf 'cell\tside\tmodel\tattention\tremat\tbatch\tdtype\trc\tseconds\tstatus\tnote\n' >"$WORK/cells.tsv"
(nvidia-smi || echo "no nvidia-smi") >"$WORK/logs/nvidia-smi.log" 2>&1
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
VERSIONS=$($PY - <<'EOF' 2>/dev/null
import importlib.metadata as md
names = ("jax", "jaxlib", "flax", "torch", "open_clip_torch")
out = []
for n in names:
    try:
        out.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print(", ".join(out))
EOF
)
COMMIT=${GPU_SUITE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
$PY - "$WORK/meta.json" "$SMOKE" "${GPU_NAME:-}" "$COMMIT" "$VERSIONS" "$SET" <<'EOF'
import datetime, json, sys
path, smoke, gpu, commit, versions, cell_set = sys.argv[1:]
with open(path, "w") as f:
    json.dump({"date": datetime.date.today().isoformat(), "smoke": int(smoke), "gpu": gpu or None,
               "commit": commit, "versions": versions, "set": cell_set}, f, indent=2)
EOF
echo "gpu_suite: set=$SET smoke=$SMOKE gpu='${GPU_NAME:-none}' budget ${BUDGET_S} s, work dir $WORK; $VERSIONS"

while IFS= read -r line; do
  [ -n "$line" ] || continue
  name=${line%%|*}
  if [ -n "${GPU_SUITE_CELLS:-}" ] && [[ ",$GPU_SUITE_CELLS," != *",$name,"* ]]; then continue; fi
  run_cell "$line"
done <<<"$ALL_CELLS"

# ----------------------------------------------------------------------------- table and results
$PY experiments/gpu_table.py "$WORK" --md="$DEST/gpu_table.md" --json="$DEST/gpu_results.json" \
  || echo "ERROR: experiments/gpu_table.py failed; the raw cells are in gpu_suite.tar.gz"
echo "gpu_suite: done in $(elapsed) s"
cp "$WORK/gpu_suite.log" "$DEST/gpu_suite.log"
tar -czf "$DEST/gpu_suite.tar.gz" -C "$WORK" --exclude=site --exclude=site_transformers4 . 2>/dev/null \
  || echo "WARNING: tar failed"
echo "gpu_suite: wrote $DEST/{gpu_table.md,gpu_results.json,gpu_suite.log,gpu_suite.tar.gz}"
[ "${GPU_SUITE_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
