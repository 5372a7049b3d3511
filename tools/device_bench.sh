# Benchmark pass on the device machine: SIMT vs SDPA backends + peaks, then the tile sweep.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
timeout ${BENCH_TIMEOUT:-420} python3 -m portattn bench --json $OUT/bench.json --plot $OUT/bench.png --label "${LABEL:-}" ${BENCH_ARGS:-} 2>$OUT/bench_progress.txt | tee $OUT/bench.txt
[ -n "${SWEEP:-}" ] && timeout 200 python3 tools/tile_sweep.py ${SWEEP} 2>&1 | tee $OUT/sweep.txt
