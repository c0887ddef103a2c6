#!/usr/bin/env bash
# Run every benchmark at its GPU defaults (they switch to them when CUDA is present) and write one JSON
# line per benchmark to OUT/<name>.json, plus the MFU variants (torch.compile of the layers, the dense
# mask) and OUT/all.jsonl with every line. Usage, from the repository root:
#   bash benchmarks/gpu_all.sh [OUT]        (default OUT: benchmarks/results/<UTC date>-<time>)
# A benchmark that fails writes its error line instead and the rest go on; BENCH_TIMEOUT (seconds,
# default 1800) bounds each one. Record the numbers in benchmarks/README.md with the machine.
set -uo pipefail
out=${1:-benchmarks/results/$(date -u +%Y%m%d-%H%M)}
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: the GPU defaults need one (on CPU run: python -m benchmarks.run)" >&2
  exit 1
fi
mkdir -p "$out"
python -c "import torch; print(torch.cuda.get_device_name(0))" > "$out/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/machine.txt" 2>/dev/null
names=$(python -c "import pkgutil, benchmarks
print(' '.join(sorted(m.name[6:] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith('bench_'))))")
run() {  # run NAME COMMAND...: the command's JSON lines into OUT/NAME.json
  local name=$1; shift
  echo "== $name: $*" >&2
  timeout "${BENCH_TIMEOUT:-1800}" "$@" | grep '^{' > "$out/$name.json" \
    || echo "{\"benchmark\": \"$name\", \"error\": \"failed or timed out (exit ${PIPESTATUS[0]})\"}" > "$out/$name.json"
}
for n in $names; do
  run "$n" python -m benchmarks.run "$n"
done
run mfu_compile python -m benchmarks.bench_mfu --compile --no-compare
run mfu_activation_checkpointing python -m benchmarks.bench_mfu --activation-checkpointing --no-compare
cat "$out"/*.json > "$out/all.jsonl"
echo "wrote $out/all.jsonl" >&2
