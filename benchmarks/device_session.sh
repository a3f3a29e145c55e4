#!/usr/bin/env bash
# The one prepared call for a lent GPU (an H100/H200 drawn for an issue; see the developers' guide): build, then
# correctness, then the measurements, most important first, each step capped so the whole run ends within TOTAL
# seconds (default 540, under the device tool's 600 s per call). Everything lands under OUT: env.txt (git sha,
# nvidia-smi, versions), steps.txt (one line per step: exit code, seconds, cap), <step>.log, selftest/, tune.json,
# dispatch.json (the measured-dispatch cache of this run), bench_overhead_cuda.json and results/ (the JSON every
# bench_<op>.py writes). Commit OUT's files under benchmarks/results/ afterwards.
#
#   run: bash benchmarks/device_session.sh "$OUT"            (on the device, from the repository root)
#   here: bash benchmarks/device_session.sh /tmp/out 60      (no GPU: the build and info run, the rest say so)
set -u
OUT=${1:?usage: bash benchmarks/device_session.sh OUT [total_seconds]}
TOTAL=${2:-540}
case $TOTAL in '' | *[!0-9]*) echo "device_session.sh: total_seconds must be a whole number, got '$TOTAL'" >&2; exit 2 ;; esac
mkdir -p "$OUT/results" || exit 2
export FASTVIT_DISPATCH_CACHE="$OUT/dispatch.json"
START=$SECONDS
MARK="$OUT/.start"
touch "$MARK"

step() {  # step NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logs to OUT/NAME.log
  local name=$1 cap=$2 left t began rc
  shift 2
  left=$((TOTAL - (SECONDS - START)))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then
    echo "$name: not run, $left s of the $TOTAL s left" | tee -a "$OUT/steps.txt"
    return
  fi
  began=$SECONDS
  timeout --kill-after=10 "$t" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - began)) s (cap $t s)$([ $rc -eq 124 ] && echo ', cut off')" | tee -a "$OUT/steps.txt"
}

{
  echo "git: $(git rev-parse HEAD 2>&1) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi 2>&1 | head -20
  python -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)' 2>&1
} >"$OUT/env.txt"

# 1. build and correctness first: a failure here is what the issue reports before any speed.
step build 240 pip install -e . --no-build-isolation --no-deps
step info 30 python -m fastvit.info
step selftest 270 python -m fastvit.selftest --budget-min 4 --out "$OUT/selftest"
# 2. measured dispatch on the model (issue #14 item 5), then the op benchmarks (issue #15 item 7).
step tune 90 python benchmarks/tune_models.py --models vit_base_patch16_224 --batches 256 1 --json "$OUT/tune.json"
step bench_attention 60 python benchmarks/bench_attention.py --quick
step bench_linear 60 python benchmarks/bench_linear.py --models B --batches 256 --backward
step bench_layer_norm 40 python benchmarks/bench_layer_norm.py --batches 256 --widths 768 --backward
step bench_overhead 40 python benchmarks/bench_overhead.py --device cuda --rounds 5 --json "$OUT/bench_overhead_cuda.json"

find benchmarks/results -maxdepth 1 -name '*.json' -newer "$MARK" -exec cp {} "$OUT/results/" \;
rm -f "$MARK"
echo "device_session.sh: $((SECONDS - START)) s of $TOTAL; steps in $OUT/steps.txt"
