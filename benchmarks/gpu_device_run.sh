#!/usr/bin/env bash
# One call on a bare GPU machine (torch + CUDA + Triton, no Ray, no network): run the named GPU benchmarks and
# leave their tables (.md), JSON and logs under $OUT. monai travels as a wheel in .whl/ (see docs/benchmarks.md).
#   bash benchmarks/gpu_device_run.sh gpu_search:280 gpu_detector:150     # name:seconds-limit ...
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
for item in "$@"; do
  name=${item%%:*}
  limit=${item##*:}
  started=$(date +%s)
  timeout "$limit" python3 "benchmarks/$name.py" --out "$OUT/$name.json" > "$OUT/$name.md" 2> "$OUT/$name.log"
  echo "$name: exit $? after $(( $(date +%s) - started )) s" >> "$OUT/machine.txt"
done
cat "$OUT/machine.txt"
for item in "$@"; do name=${item%%:*}; echo "== $name"; tail -c 5000 "$OUT/$name.md"; tail -5 "$OUT/$name.log"; done
