#!/usr/bin/env bash
# Mutation testing of one module of the compute core with mutmut (pinned in constraints.txt): small faults are
# put into a copy of the working tree's source files (tracked and new files git does not ignore: new tests count
# before they are committed; .venv and outputs stay behind) and the module's tests must fail on each. Prints the
# mutants left alive and the killed share.
#   tools/mutation.sh MODULE TEST_FILE...      e.g. tools/mutation.sh raymem/audit/statistics.py tests/unit/test_seed_statistics.py
#   MUTANTS="raymem.data.formats.x_pseudonymize__mutmut_*" tools/mutation.sh ...   only these functions' mutants
# Results and timings per module are in docs/testing.md. Not in CI: a module takes minutes to an hour on 2 cores.
set -euo pipefail
module=$1; shift
[[ $# -gt 0 ]] || { echo "name the test files that cover $module" >&2; exit 2; }
root=$(git rev-parse --show-toplevel)
bin="$root/.venv/bin"
"$bin/python" -c "import mutmut" 2>/dev/null || "$bin/pip" install -q -c "$root/constraints.txt" mutmut
work=$(mktemp -d /tmp/raymem-mutation.XXXX)
git -C "$root" ls-files -z --cached --others --exclude-standard \
  | tar -C "$root" -c --null -T - --ignore-failed-read -f - 2>/dev/null | tar -x -C "$work"
cd "$work"
sed -i 's/^addopts = .*/addopts = "-p no:logging"/' pyproject.toml   # mutmut drives pytest's reporting itself
{
  echo "[mutmut]"
  # forkserver: forked from the suite's parent process (torch loaded, its thread pool started), a mutant's test
  # run can hang on torch's locks and count as a timeout; a fresh server process does not
  echo "process_isolation=forkserver"
  echo "paths_to_mutate=$module"
  printf 'also_copy=raymem/\n    tests/\n'
  printf 'tests_dir=%s\n' "$1"; shift
  for test_file in "$@"; do printf '    %s\n' "$test_file"; done
} > setup.cfg
started=$(date +%s)
# One torch thread per forked test run: with torch's default threads, mutants on a busy machine hit mutmut's
# CPU-time limit and count as timeouts instead of killed or survived.
read -r -a selected <<< "${MUTANTS:-}"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAY_AUTH_MODE=disabled \
  "$bin/mutmut" run --max-children "${MUTATION_JOBS:-2}" "${selected[@]}" >/dev/null 2>&1 || true
"$bin/mutmut" results --all true > all-results.txt 2>&1 || true
if [[ ${#selected[@]} -gt 0 ]]; then   # count only the selected functions' mutants
  pattern=$(printf '%s|' "${selected[@]//\*/.*}"); grep -E "^ *(${pattern%|}):" all-results.txt > results.txt || true
else
  cp all-results.txt results.txt
fi
killed=$(grep -c ": killed" results.txt || true)
survived=$(grep -c ": survived" results.txt || true)
total=$(grep -cE ": (killed|survived|timeout|suspicious|no tests|segfault|skipped)" results.txt || true)
grep -E ": (survived|no tests|timeout|suspicious)" results.txt || true
echo "$module: $killed of $total mutants killed, $survived survived ($(( $(date +%s) - started )) s); work in $work"
