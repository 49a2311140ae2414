#!/usr/bin/env bash
# The fine-tuning benchmark of BENCHMARKS.md: head-only and all-layer fine-tuning of a DP-Cap
# encoder on a class folder, at epsilon 1, 4, 8 and non-privately, with augmentation
# multiplicity off (1 view) and on (4 views); one line per run: name, top-1, wall seconds.
# Mild crops (90-100% of the area) without flips: a mirrored digit is another digit, or none.
#
#   benchmarks/finetune_digits.sh FOLDER ENCODER_CHECKPOINT [RUN ...]    # RUN: e.g. head_eps8_v1
set -euo pipefail
folder=$1 init=$2
shift 2
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
    for layers in head all; do
        for eps in 1 4 8 inf; do runs+=("${layers}_eps${eps}_v1" "${layers}_eps${eps}_v4"); done
    done
fi
mkdir -p logs
for run in "${runs[@]}"; do
    IFS=_ read -r layers eps views <<< "$run"
    eps=${eps#eps} views=${views#v}
    lr=$([ "$layers" = head ] && echo ${HEAD_LR:-1e-1} || echo ${ALL_LR:-2e-3})
    privacy=(privacy.target_epsilon="$eps")
    [ "$eps" = inf ] && privacy=(privacy.enabled=false --allow-non-private)
    rm -rf "runs/$run"  # a fresh run, not a resume
    start=$(date +%s.%N)
    python -m trainer.train --config finetune_own data.classes="$folder" --init "$init" name="$run" \
        finetune.layers="$layers" finetune.views="$views" optim.lr="$lr" "${privacy[@]}" \
        finetune.crop=0.9 finetune.flip=false steps=200 ds.train_batch_size=64 eval.val_fraction=0.2 checkpoint.every_steps=0 \
        metrics.progress=false > "logs/$run.log" 2>&1
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    printf '%s\t%s\t%.0f s\n' "$run" "$(grep -o 'fine-tuned top-1: [0-9.]*' "logs/$run.log" | cut -d' ' -f3)" "$seconds"
done
