#!/bin/sh
# bench_dp.sh [ROUNDS] [bench_dp flags] — one process with 2 threads against
# 2 MPI ranks with 1 thread each, on the same global batch, ROUNDS times
# (default 3) in alternation (the machine is shared: only ratios measured in
# the same run mean anything). Prints bench_dp's JSON lines, then the medians
# over the rounds. docs/performance.md records the results.
set -u
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
[ $# -gt 0 ] && shift
make -s build/bench_dp || exit 1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
out=$(mktemp "${TMPDIR:-/tmp}/klvae-bench-dp-XXXXXX")
trap 'rm -f "$out"' EXIT
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores"
for r in $(seq "$ROUNDS"); do
    mpirun --bind-to none -np 1 build/bench_dp --alone --threads 2 "$@" | tee -a "$out"
    mpirun --bind-to none -np 2 build/bench_dp --threads 1 "$@" | tee -a "$out"
done
python3 - "$out" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
one = [r for r in rows if r["ranks"] == 1]
two = [r for r in rows if r["ranks"] == 2]
m = lambda rs, k: statistics.median(r[k] for r in rs)
print("1 rank x 2 threads: step %.3f s (median of %d rounds)" % (m(one, "step_s"), len(one)))
print("2 ranks x 1 thread: step %.3f s, in the communicator %.3f s (%.1f %% of the step); "
      "one MPI_Allreduce of the %d floats alone: %.4f s"
      % (m(two, "step_s"), m(two, "comm_s"), 100 * m(two, "comm_share"),
         two[0]["floats_summed_per_step"], m(two, "allreduce_alone_s")))
print("speed of 2 ranks x 1 thread against 1 rank x 2 threads: %.2fx"
      % (m(one, "step_s") / m(two, "step_s")))
PYEOF
