#!/bin/bash
# Reproduces docs/evaluation/ (run from the repository root; ~30 min on 2 shared cores).
# Each dataset: import -> full pipeline in a private work dir -> `evaluate` (fits exactly as `train` does,
# scores the held-out test cut-off, writes <label>/report.md + PNGs and merges metrics.json / README.md).
# `propensity evaluate` takes the options below; ROOT is where the work dirs go.
set -euo pipefail
ROOT=${ROOT:-/tmp/propensity-eval}
EVALUATE=${EVALUATE:-".venv/bin/propensity evaluate"}

pipeline() {  # NAME RAW_DIR -> $ROOT/NAME/{var,feature_repo}
  local dir=$ROOT/$1
  mkdir -p "$dir/feature_repo"
  cp feature_repo/*.py feature_repo/feature_store.yaml "$dir/feature_repo/"
  cp feature_repo/.feastignore "$dir/feature_repo/" 2>/dev/null || true
  PROPENSITY_WORK_DIR=$dir/var PROPENSITY_FEATURE_REPO=$dir/feature_repo PROPENSITY_DATA_DIR=$2 \
    PROPENSITY_SERVER__SCORING_BACKEND=lightgbm PROPENSITY_TRAINING__N_CUTOFFS=${3:-4} .venv/bin/propensity run
}
evaluate() {  # NAME LABEL [options]
  local dir=$ROOT/$1; shift
  $EVALUATE --work-dir "$dir/var" --feature-repo "$dir/feature_repo" --out docs/evaluation --label "$@"
}

.venv/bin/propensity demo-data --out "$ROOT/raw_demo"            # 2,000 users, 400 items, 60 days (defaults)
pipeline demo "$ROOT/raw_demo"
evaluate demo demo_h7 --trials 15 --tuning-seconds 60

.venv/bin/propensity import uci-online-retail --out "$ROOT/raw_uci"
pipeline uci "$ROOT/raw_uci" 8
evaluate uci uci_online_retail_h7 --n-cutoffs 8 --horizon-days 7 --trials 15 --tuning-seconds 60
evaluate uci uci_online_retail_h30 --n-cutoffs 8 --horizon-days 30 --trials 0

# DIGINETICA: only the 1 % sample of the views is available here (30k events, 8 buyers in the test
# week, mostly anonymous one-session shoppers), so its numbers carry no statistical weight.
.venv/bin/propensity import diginetica --out "$ROOT/raw_diginetica"
pipeline diginetica "$ROOT/raw_diginetica" 8
evaluate diginetica diginetica_h7 --n-cutoffs 8 --horizon-days 7 --trials 0
