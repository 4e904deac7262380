#!/usr/bin/env bash
# The small-batch study (docs/comparison.md): BN, GN, SN, SSN on Fashion-MNIST with the small
# ResNet at per-device batch 2, 4, 8, 32; per-device statistics (no synchronisation); the lr scaled
# linearly with the batch (LR per 256 images); every run trains on the same number of images
# (FRACTION of the 50,000-image training split per epoch, EPOCHS epochs) and is evaluated on
# 10,000 held-out training images (val/acc1 at the end of training).
#   benchmarks/small_batch_study.sh [SEEDS...]     (default: 0 1 2; running it again resumes)
# Then the report (table, CSV, plots) goes to REPORT (default docs/img/small-batch). Runs the
# ssn-bench of the active environment (pip install -e .).
# The full grid (3 seeds, 5 batch sizes, 8 full epochs at the demo's lr; days on 2 CPU cores):
#   OUT=outputs/sweeps/small-batch-full REPORT=outputs/sweeps/small-batch-full/report FRACTION=1.0 EPOCHS=8 LR=0.2 \
#     BATCHES="2 4 8 32 128" benchmarks/small_batch_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/sweeps/small-batch}
REPORT=${REPORT:-docs/img/small-batch}
FRACTION=${FRACTION:-0.08}
EPOCHS=${EPOCHS:-1}
LR=${LR:-0.8}
BATCHES=${BATCHES:-"2 4 8 32"}
JOBS=${JOBS:-2}
SEEDS=${*:-0 1 2}
for seed in $SEEDS; do  # seed-major: a whole seed before the next one
  ssn-bench sweep --out "$OUT" --jobs "$JOBS" --threads 1 \
    --task configs/fashion_mnist/resnet_small_fashionmnist-28.yaml --norms bn gn sn ssn \
    --batch-sizes $BATCHES --seeds "$seed" \
    --set trainer.max_epochs="$EPOCHS" --set trainer.limit_train_batches="$FRACTION" \
    --set model.init_args.lr="$LR" --set data.init_args.val_size=10000 --set data.init_args.eval_batch_size=500 \
    --set trainer.num_sanity_val_steps=0 --set trainer.enable_progress_bar=false \
    --set trainer.enable_model_summary=false -- --export=false || true  # failures are reported, the rest goes on
done
ssn-bench compare "$OUT" --out "$REPORT" --metric val/acc1 \
  --group-by norm batch_size global_batch_size \
  --title "Small-batch study: Fashion-MNIST, small ResNet, per-device statistics"
