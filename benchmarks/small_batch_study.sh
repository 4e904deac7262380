#!/usr/bin/env bash
# The small-batch study (docs/comparison.md; issue 21): the paper's per-GPU batch experiment on one
# process. Fashion-MNIST, the small ResNet, BN / GN / SN / SSN, 8 virtual devices (each computes
# its own batch statistics, as 8 GPUs without SyncBN do) of 2, 8 or 32 images (global batch 16, 64,
# 256), the main job's recipe (SGD, lr 0.2 per 256 images scaled linearly with the global batch,
# cosine), EPOCHS full epochs of the 55,000 training images for every setting, scored on the
# 10,000 test images (test/acc1 after fit).
#   benchmarks/small_batch_study.sh [SEEDS...]     (default: 0 1 2; running it again resumes)
# Then the report (table, CSV, plots) goes to REPORT (default docs/img/small-batch). Runs the
# ssn-bench of the active environment (pip install -e .). JOBS runs at a time, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/sweeps/small-batch-8x}
REPORT=${REPORT:-docs/img/small-batch}
EPOCHS=${EPOCHS:-6}
DEVICES=${DEVICES:-8}
BATCHES=${BATCHES:-"2 8 32"}
JOBS=${JOBS:-2}
SEEDS=${*:-0 1 2}
for seed in $SEEDS; do  # seed-major: a whole seed before the next one
  ssn-bench sweep --out "$OUT" --jobs "$JOBS" --threads 1 \
    --task configs/fashion_mnist/resnet_small_fashionmnist-28.yaml --norms bn gn sn ssn \
    --virtual-devices "$DEVICES" --batch-sizes $BATCHES --seeds "$seed" \
    --set trainer.max_epochs="$EPOCHS" --set data.init_args.eval_batch_size=500 \
    --set trainer.num_sanity_val_steps=0 --set trainer.enable_progress_bar=false \
    --set trainer.enable_model_summary=false || true  # failures are reported, the rest goes on
done
ssn-bench compare "$OUT" --out "$REPORT" --metric test/acc1 exported/test/acc1 \
  --group-by norm device_batch_size global_batch_size \
  --title "Small-batch study: Fashion-MNIST, $DEVICES virtual devices, $EPOCHS epochs"
