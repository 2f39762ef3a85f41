#!/usr/bin/env bash
# The main job: install (scripts/setup_env.sh: venv .venv, torch, mmcl_fast with its compiled
# kernels), then a whole continual run on the CPU: `mmcl-fast run digits` (scikit-learn's digits,
# 5 class-incremental tasks of 2 classes, two image halves as two modalities, op family A's
# optimizer with OGM-GE modulation and herding replay). The log (log.jsonl), the result matrix and
# metrics (results.json) and the PNG report land in ${MMCL_FAST_RUN_DIR:-runs/digits}; the table is
# printed. Extra arguments go to `mmcl-fast run digits` (e.g. --set epochs=3, --fresh).
# Then `mmcl-fast compare mofot`: MoFot against fine-tuning on PyKEEN's UMLS (5 HYBRID snapshots,
# entity names through all-MiniLM-L6-v2, 3 seeds), one run per strategy and seed in
# ${MMCL_FAST_MOFOT_DIR:-runs/mofot-umls}/<strategy>/seed<k>, and the table of the two
# (comparison.md, comparison.json, comparison.png).
# Then `mmcl-fast run mspt` in a small form (IMRE on the offline WordNet set: 5 tasks, 60 training
# pairs per task, 2 epochs) into ${MMCL_FAST_MSPT_DIR:-runs/mspt-imre}. Its
# labels are distant supervision (WordNet's links), not annotation.
# MMCL_FAST_MAIN_BENCH=1 then also runs the benchmarks of every op family and prints their table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=$(realpath -m "${MMCL_FAST_VENV:-.venv}")
"$venv/bin/mmcl-fast" info
"$venv/bin/mmcl-fast" run digits --output "${MMCL_FAST_RUN_DIR:-runs/digits}" --no-progress "$@"
"$venv/bin/mmcl-fast" compare mofot --strategies mofot,finetune --seeds 0,1,2 --set kg=umls \
  --output "${MMCL_FAST_MOFOT_DIR:-runs/mofot-umls}" --no-progress
"$venv/bin/mmcl-fast" run mspt --set task=imre --set max_train_per_task=60 --set max_test_per_task=80 \
  --set epochs=2 --output "${MMCL_FAST_MSPT_DIR:-runs/mspt-imre}" --no-progress
if [ "${MMCL_FAST_MAIN_BENCH:-0}" = 1 ]; then
  "$venv/bin/mmcl-fast" bench --benchmarks benchmarks --json "${MMCL_FAST_BENCH_JSON:-bench-main.json}"
fi
