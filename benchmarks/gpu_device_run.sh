#!/usr/bin/env bash
# One call on a bare GPU machine (torch + CUDA + Triton, no Ray, no network): run the named GPU benchmarks one after
# another and leave their tables (.md) and JSON under $OUT, with the machine and every stderr in run.log (few files:
# the device tool brings back at most 8). monai travels as a wheel in .whl/ (docs/benchmarks.md).
#   bash benchmarks/gpu_device_run.sh gpu_search:280 gpu_detector:150          # name:seconds-limit ...
#   bash benchmarks/gpu_device_run.sh "gpu_reproduce:420:--budget-s 400"        # name:seconds-limit:arguments
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
  nproc
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/run.log" 2>&1
for item in "$@"; do
  name=${item%%:*}
  rest=${item#*:}
  limit=${rest%%:*}
  extra=""
  [[ $rest == *:* ]] && extra=${rest#*:}
  started=$(date +%s)
  # shellcheck disable=SC2086  # the arguments are meant to split
  echo "== $name $extra" >> "$OUT/run.log"
  timeout "$limit" python3 "benchmarks/$name.py" --out "$OUT/$name.json" $extra > "$OUT/$name.md" 2>> "$OUT/run.log"
  echo "$name ($extra): exit $? after $(( $(date +%s) - started )) s" | tee -a "$OUT/run.log"
done
for item in "$@"; do name=${item%%:*}; echo "== $name"; tail -c 3000 "$OUT/$name.md"; done
grep -E "^(==|gpu_)|Error|error" "$OUT/run.log" | tail -20
