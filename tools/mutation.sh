#!/usr/bin/env bash
# Mutation testing of one module of the compute core with mutmut (pinned in constraints.txt): small faults are
# put into a copy of the working tree's source files (tracked and new files git does not ignore: new tests count
# before they are committed; .venv and outputs stay behind) and the module's tests must fail on each. Prints mutmut's per-mutant results and the killed share.
#   tools/mutation.sh MODULE TEST_FILE...      e.g. tools/mutation.sh raymem/audit/statistics.py tests/unit/test_seed_statistics.py
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
  echo "paths_to_mutate=$module"
  printf 'also_copy=raymem/\n    tests/\n'
  printf 'tests_dir=%s\n' "$1"; shift
  for test_file in "$@"; do printf '    %s\n' "$test_file"; done
} > setup.cfg
started=$(date +%s)
RAY_AUTH_MODE=disabled "$bin/mutmut" run --max-children "${MUTATION_JOBS:-2}" >/dev/null 2>&1 || true
"$bin/mutmut" results --all true > results.txt 2>&1 || true
killed=$(grep -c ": killed" results.txt || true)
survived=$(grep -c ": survived" results.txt || true)
total=$(grep -cE ": (killed|survived|timeout|suspicious|no tests|segfault|skipped)" results.txt || true)
grep -E ": (survived|no tests|timeout|suspicious)" results.txt || true
echo "$module: $killed of $total mutants killed, $survived survived ($(( $(date +%s) - started )) s); work in $work"
