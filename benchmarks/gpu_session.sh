#!/usr/bin/env bash
# One GPU session, run from the repository root:   bash benchmarks/gpu_session.sh
#
# 1. device-side data path, bf16 and fast-vs-plain step checks (benchmarks/gpu_checks.py), and
#    the cost of building a step's views (benchmarks/view_building.py: multi-crop of 64 Sen12MS
#    pairs, iBOT masks);
# 2. step time / images/s / MFU (`rsdino bench train` in model, step and e2e mode, reports
#    MODE_CONFIG.json) of the quickstart preset and of vitl16_short (ViT-L/16) with and without
#    train.activation_checkpointing, and model mode of ViT-B/16 (also e2e), ViT-S/16 and the
#    multimodal preset; vitl16_short tries the preset's own batch first and, only when a run
#    runs out of GPU memory, batch 32, then batch 32 with 4 local crops;
# 3. the checkpoint stall (async vs sync) and recovery benchmark (benchmarks/checkpoint_stall.py).
#
# Every JSON and session.log land in $OUT (./gpu_out when unset). A failed or timed-out command is
# logged and the session goes on; the exit status is 1 if anything failed. The whole session
# stays inside GPU_SESSION_BUDGET_S seconds (default 600): each command's timeout is cut to what
# is left and nothing starts with under 15 s left.
#
# GPU_SESSION_DRY_RUN=1 runs the same sequence on the CPU with a tiny model, to test this script.
set -u

OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_SESSION_BUDGET_S:-600}"
DRY_RUN="${GPU_SESSION_DRY_RUN:-0}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
: >"$LOG"
STEP_OUTPUT="$(mktemp)" # the output of the latest command, also appended to the log
trap 'rm -f "$STEP_OUTPUT"' EXIT
failures=0

log() {
    echo "[$(date +%H:%M:%S) +$((SECONDS))s] $*" | tee -a "$LOG"
}

# run_step NAME TIMEOUT_S COMMAND...: run with a timeout, output to the log; 0 if it succeeded.
run_step() {
    local name=$1 limit=$2 left rc
    shift 2
    : >"$STEP_OUTPUT"
    left=$((BUDGET_S - SECONDS))
    if ((left < 15)); then
        log "SKIP $name: session budget of ${BUDGET_S}s spent"
        return 1
    fi
    ((limit > left)) && limit=$left
    log "START $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$STEP_OUTPUT" 2>&1
    rc=$?
    cat "$STEP_OUTPUT" >>"$LOG"
    if ((rc == 0)); then
        log "OK $name"
    elif ((rc == 124 || rc == 137)); then
        log "FAIL $name: timed out after ${limit}s"
    else
        log "FAIL $name: exit status $rc"
    fi
    return "$rc"
}

# --- Environment: carried wheels, then the package from this checkout -------------------------
# (Not on a dry run: the wheels are built for the GPU machine's Python.)
if [ -d .whl ] && [ "$DRY_RUN" != "1" ]; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        log "installed carried wheels into /tmp/site"
    else
        log "FAIL installing the carried wheels from .whl/"
        failures=$((failures + 1))
    fi
    export PYTHONPATH="/tmp/site:$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY_RUN" = "1" ]; then
    log "DRY RUN: tiny model on the CPU"
    # tests/conftest.py TINY_OVERRIDES, with block chunks that divide its depth of 2.
    RUN_OVERRIDES=(
        train.device=cpu train.num_workers=0 train.batch_size_per_gpu=4
        train.OFFICIAL_EPOCH_LENGTH=3 train.synthetic.num_samples=64 train.synthetic.tile_size=32
        optim.epochs=2 optim.warmup_epochs=1 student.embed_dim=32 student.depth=2
        student.num_heads=2 student.block_chunks=2 crops.global_crops_size=32
        crops.local_crops_size=16 crops.local_crops_number=2 dino.head_n_prototypes=64
        dino.head_hidden_dim=32 dino.head_bottleneck_dim=16
    )
    CHECK_ARGS=(--device cpu --batch 4 --tile 32 --repeats 2 --vit-arch vit_small --vit-depth 2
        --vit-batch 2 --vit-image 32 --crops crops.global_crops_size=32 crops.local_crops_size=16
        crops.local_crops_number=2 --step-steps 2 --step-overrides train.synthetic.tile_size=32
        crops.global_crops_size=32 crops.local_crops_size=16 train.batch_size_per_gpu=4
        train.precision=bf16)
    VIEW_ARGS=(--device cpu --batch 4 --tile 64 --global-size 32 --local-size 16 --repeats 2)
    QUICKSTART_STEPS=(--warmup 1 --steps 2)
    VITL_STEPS=(--warmup 1 --steps 2)
else
    RUN_OVERRIDES=(train.device=cuda)
    CHECK_ARGS=(--device cuda)
    VIEW_ARGS=(--device cuda)
    QUICKSTART_STEPS=(--warmup 5 --steps 20)
    VITL_STEPS=(--warmup 3 --steps 10)
fi

log "python: $("$PYTHON" --version 2>&1); PYTHONPATH=$PYTHONPATH"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi 2>&1 | tee -a "$LOG"
else
    log "nvidia-smi not found"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

# --- 1. Functional checks -----------------------------------------------------------------
run_step gpu_checks 120 "$PYTHON" benchmarks/gpu_checks.py "${CHECK_ARGS[@]}" \
    --out "$OUT/gpu_checks.json" || failures=$((failures + 1))
run_step view_building 90 "$PYTHON" benchmarks/view_building.py "${VIEW_ARGS[@]}" \
    --out "$OUT/view_building.json" || failures=$((failures + 1))

# --- 2. Step time, images/s and MFU: optimisation alone, full step, end to end --------------
BENCH_MODES=(model step e2e)

# bench_vitl NAME MODE OVERRIDES...: vitl16_short at the preset's batch; smaller ones only after
# an out-of-memory failure (any other failure would repeat, so it ends the attempts).
bench_vitl() {
    local name=$1 mode=$2
    shift 2
    local fallback
    for fallback in "" "train.batch_size_per_gpu=32" \
        "train.batch_size_per_gpu=32 crops.local_crops_number=4"; do
        # shellcheck disable=SC2086  # the fallback is a list of overrides, split on purpose
        # 240 s: the first warm-up steps include compiling the blocks.
        run_step "$name${fallback:+ ($fallback)}" 240 "$PYTHON" -m rsdino.cli bench train \
            --config vitl16_short --mode "$mode" "${VITL_STEPS[@]}" --out "$OUT/$name.json" \
            "${RUN_OVERRIDES[@]}" "$@" $fallback && return 0
        grep -qi "out of memory" "$STEP_OUTPUT" || return 1
    done
    return 1
}
# bench NAME TIMEOUT_S MODE CONFIG OVERRIDES...: one `rsdino bench train` run. The model's
# overrides come before the session's, so a dry run shrinks every model alike.
bench() {
    local name=$1 limit=$2 mode=$3 config=$4
    shift 4
    run_step "$name" "$limit" "$PYTHON" -m rsdino.cli bench train --config "$config" \
        --mode "$mode" "${VITL_STEPS[@]}" --out "$OUT/$name.json" "$@" "${RUN_OVERRIDES[@]}"
}
# Most wanted first, in case the budget runs out: ViT-L model mode is the figure the reference
# trainer is compared on, then issue 11's other targets (ViT-B/16 192 batch 64 in model and e2e
# mode, ViT-S/16 224 batch 128, ViT-B per sensor multimodal), then what compiling buys (eager),
# the other ViT-L modes and activation checkpointing (model mode only).
# train.compile is auto (on) on CUDA.
bench_vitl model_vitl16_short model || failures=$((failures + 1))
VITB=(student.arch=vit_base crops.global_crops_size=192)
bench model_vitb16 150 model vitl16_short "${VITB[@]}" || failures=$((failures + 1))
bench e2e_vitb16 150 e2e vitl16_short "${VITB[@]}" || failures=$((failures + 1))
bench model_vits16 150 model vitl16_short student.arch=vit_small train.batch_size_per_gpu=128 ||
    failures=$((failures + 1))
bench model_multimodal_vitb16 150 model vitl16_short_multimodal || failures=$((failures + 1))
bench_vitl model_vitl16_short_eager model train.compile=false || failures=$((failures + 1))
for mode in step e2e; do
    bench_vitl "${mode}_vitl16_short" "$mode" || failures=$((failures + 1))
done
bench_vitl model_vitl16_short_ac model train.activation_checkpointing=true ||
    failures=$((failures + 1))
for mode in "${BENCH_MODES[@]}"; do
    run_step "${mode}_quickstart" 120 "$PYTHON" -m rsdino.cli bench train --config quickstart \
        --mode "$mode" "${QUICKSTART_STEPS[@]}" --out "$OUT/${mode}_quickstart.json" \
        "${RUN_OVERRIDES[@]}" || failures=$((failures + 1))
done

# --- 3. Checkpoint stall (async vs sync) and recovery from a killed worker -------------------
if [ "$DRY_RUN" = "1" ]; then
    STALL_ARGS=(--config quickstart --steps 4 --every 2 --procs 1)
else
    STALL_ARGS=(--config vitl16_short --steps 15 --every 5 --procs 1)
fi
run_step checkpoint_stall 200 "$PYTHON" benchmarks/checkpoint_stall.py "${STALL_ARGS[@]}" \
    --out "$OUT/ckpt_stall.json" "${RUN_OVERRIDES[@]}" || failures=$((failures + 1))

log "done in ${SECONDS}s with $failures failure(s); results in $OUT"
find "$OUT" -maxdepth 1 -type f -printf '%10s  %f\n' | sort -k2 | tee -a "$LOG"
((failures == 0))
