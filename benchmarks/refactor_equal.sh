#!/usr/bin/env bash
# Behaviour kept across a refactor: run this in two checkouts and diff the outputs (docs/design.md, layers).
#   git worktree add /tmp/before REV
#   bash benchmarks/refactor_equal.sh /tmp/before /tmp/eq-before > before.txt
#   bash benchmarks/refactor_equal.sh . /tmp/eq-after > after.txt && diff before.txt after.txt
# Same seeds -> the same training losses (every logged step, every evaluation, full precision) for a
# top-k MoE and a group-limited sigmoid_bias MoE, and the same sampled tokens from each checkpoint on the
# module path and on the fast decode path. OUT must be new or empty: nothing already there is touched.
set -euo pipefail
TREE=$(cd "$1" && pwd); OUT=$2
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "refactor_equal.sh: $OUT is not empty: give a new folder" >&2; exit 2
fi
export PYTHONPATH=$TREE/src MOELAB_CACHE=$OUT/cache
mkdir -p "$OUT"
common=(--preset smoke --set data.corpus=synthetic --set data.synthetic_docs=30 --set train.steps=20 --set train.eval_every=10 --no-progress)
python -m moelab train "${common[@]}" --out "$OUT/moe" > /dev/null
python -m moelab train "${common[@]}" --set moe.router.name=sigmoid_bias --set moe.router.n_group=2 --set moe.aux_loss=none \
  --out "$OUT/sig" > /dev/null
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("moe", "sig"):
    recs = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    print(run, "train", [r["loss"] for r in recs if r.get("kind") == "train"])
    print(run, "eval", [r["val_loss"] for r in recs if "val_loss" in r])
PY
for run in moe sig; do
  for fast in "" "--fast"; do
    printf '%s decode%s ' "$run" "$fast"
    python -m moelab generate "$OUT/$run" --prompt "def f(x):" --max-tokens 16 --temperature 0.9 --seed 3 --ignore-eos --json $fast 2>/dev/null
  done
done
