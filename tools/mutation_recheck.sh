#!/usr/bin/env bash
# Recheck the survivors of a tools/mutation.sh run against whole test files.
#
# mutmut runs each mutant only against the tests its stats phase saw reach the mutated function, and it credits
# the calls a module-scoped fixture makes to the first test that sets the fixture up: a function that only a
# shared fixture calls (run_audit's matches table, say) then meets that one test, not the file's tests that check
# its output. This runs every survivor of the run against every test of the given files, in the run's mutants/
# folder with the mutant switched on as mutmut's trampolines read it (MUTANT_UNDER_TEST), and prints the ones
# still alive and how many the whole files kill. A survivor here is one no test of the files catches. The working
# tree's tests/ is copied over the run's first, so tests written since the run count (the module itself must be
# unchanged since the run: its mutants are the run's).
#   tools/mutation_recheck.sh /tmp/raymem-mutation.XXXX TEST_FILE...
#   MUTATION_JOBS=2 (default) mutants at a time; one torch/BLAS thread each, as in tools/mutation.sh.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 WORK_FOLDER_OF_A_RUN TEST_FILE..." >&2; exit 2; }
work=$(cd "$1" && pwd); shift
[[ -f $work/results.txt && -d $work/mutants ]] || { echo "$work is not a tools/mutation.sh work folder" >&2; exit 2; }
root=$(git rev-parse --show-toplevel)  # the caller's checkout: its venv and its tests
bin="$root/.venv/bin"
git -C "$root" ls-files -z --cached --others --exclude-standard -- tests \
  | tar -C "$root" -c --null -T - -f - | tar -x -C "$work/mutants"
export bin
passes() {  # passes MUTANT TEST...: the tests pass with MUTANT switched on ("none": the original code)
  cd "$work_mutants" && MUTANT_UNDER_TEST=$1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAY_AUTH_MODE=disabled \
    timeout 900 "$bin/python" -m pytest -q -x -p no:cacheprovider -p no:logging "${@:2}" >/dev/null 2>&1
}
export -f passes
export work_mutants="$work/mutants"
passes none "$@" || { echo "the tests fail without a mutant in $work/mutants: nothing to recheck" >&2; exit 1; }
survivors=$(grep -E ": survived" "$work/results.txt" | awk '{print $1}' | tr -d ':' || true)
total=$(wc -w <<< "$survivors")
started=$(date +%s)
alive=$(printf '%s\n' $survivors | xargs -r -P "${MUTATION_JOBS:-2}" -I{} bash -c 'passes "$@" && echo "$1"' _ {} "$@" \
  | sort || true)
[[ -z $alive ]] || printf '    %s: survived the whole files\n' $alive
echo "recheck: $(( total - $(wc -w <<< "$alive") )) of $total survivors killed by the whole test files," \
  "$(wc -w <<< "$alive") alive ($(( $(date +%s) - started )) s)"
