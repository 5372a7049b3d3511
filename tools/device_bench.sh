# Benchmark pass on the device machine: SIMT vs SDPA backends + peaks, then the tile sweep.
# BENCH_MODES (default "fwd") picks the bench modes run in turn: fwd (writes bench.*, takes
# BENCH_ARGS), fwd_bwd (bench_fwd_bwd.*, FWD_BWD_ARGS, about 1-2 min by default on an H100),
# bwd_memory (bench_bwd_memory.*, BWD_MEMORY_ARGS, under a minute); each within BENCH_TIMEOUT.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
for mode in ${BENCH_MODES:-fwd}; do
  case $mode in
    fwd) tag=bench; args=${BENCH_ARGS:-} ;;
    fwd_bwd) tag=bench_fwd_bwd; args=${FWD_BWD_ARGS:-} ;;
    bwd_memory) tag=bench_bwd_memory; args=${BWD_MEMORY_ARGS:-} ;;
    *) echo "device_bench.sh: unknown mode $mode in BENCH_MODES" >&2; continue ;;
  esac
  plot="--plot $OUT/$tag.png"
  [ "$mode" = bwd_memory ] && plot=""
  timeout ${BENCH_TIMEOUT:-420} python3 -m portattn bench --mode $mode --json $OUT/$tag.json $plot --label "${LABEL:-}" $args 2>$OUT/${tag}_progress.txt | tee $OUT/$tag.txt
done
[ -n "${SWEEP:-}" ] && timeout 200 python3 tools/tile_sweep.py ${SWEEP} 2>&1 | tee $OUT/sweep.txt
