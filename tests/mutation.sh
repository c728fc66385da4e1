#!/usr/bin/env bash
# `make mutation`: mutation testing of the numerical kernels and writers with mutmut.
#
# mutmut edits the files it mutates in place, so every target runs in its own scratch copy of
# the tree (under $MUTATION_DIR, default a new /tmp directory): the checkout is never touched.
# Each target is one module and the targeted tests that must kill its mutants (a few seconds a
# run), so the whole run is bounded by (mutants x test time); choose targets with
#   make mutation MUTATION_TARGETS="lanczos proxy"
# Prints, per target, killed/total and the surviving mutants as diffs; the summary line is
# the score over all targets. Not part of CI (tens of minutes on 2 cores; docs/testing.md).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PY:-$repo/.venv/bin/python}"
mutmut="$(dirname "$py")/mutmut"
if [ ! -x "$mutmut" ]; then
  echo "installing mutmut 2.5.1 into $(dirname "$(dirname "$py")") (not needed by anything else)"
  "$py" -m pip install -q "mutmut==2.5.1"
fi

# name|module|tests that must kill its mutants
declare -A TARGET=(
  [lanczos]="hpcqml/hessian/lanczos.py|tests/test_lanczos_orthogonality.py tests/test_spectrum_exact_measure.py"
  [proxy]="hpcqml/hessian/proxy.py|tests/test_proxy.py tests/test_spectrum_exact_measure.py"
  [statevector]="hpcqml/hhl/statevector.py|tests/test_hhl_closed_form.py tests/test_hhl.py"
  [timestepping]="hpcqml/carleman/timestepping.py|tests/test_bounds_independent.py tests/test_fig4.py"
  [store]="hpcqml/store.py|tests/test_store_atomic_commit.py tests/test_store.py"
)
names="${MUTATION_TARGETS:-lanczos proxy statevector timestepping store}"
base="${MUTATION_DIR:-$(mktemp -d /tmp/hpcqml-mutation.XXXXXX)}"
mkdir -p "$base"
summary="$base/summary.tsv"
: >"$summary"
start=$(date +%s)

for name in $names; do
  spec="${TARGET[$name]:?unknown mutation target $name (one of ${!TARGET[*]})}"
  module="${spec%%|*}"
  tests="${spec#*|}"
  work="$base/$name"
  rm -rf "$work"
  mkdir -p "$work"
  (cd "$repo" && tar --exclude=./.venv --exclude=./.git --exclude=./results --exclude='./*.h5' -cf - .) \
    | tar -xf - -C "$work"
  ln -s "$(dirname "$(dirname "$py")")" "$work/.venv"
  echo "== $name: $module against $tests (copy in $work)"
  t0=$(date +%s)
  (cd "$work" && OMP_NUM_THREADS=1 "$mutmut" run --paths-to-mutate "$module" --tests-dir tests \
       --runner "$work/.venv/bin/python -m pytest -x -q -p no:cacheprovider $tests" --no-progress \
       >"$work/mutmut.log" 2>&1) || true   # mutmut exits non-zero when mutants survive
  (cd "$work" && "$mutmut" junitxml >"$work/mutmut.xml" 2>/dev/null) || true
  "$py" - "$work" "$name" "$module" "$(( $(date +%s) - t0 ))" "$summary" <<'PY'
import subprocess, sys, xml.etree.ElementTree as ET
work, name, module, secs, summary = sys.argv[1:6]
root = ET.parse(f"{work}/mutmut.xml").getroot()
cases = root.iter("testcase")
total = survived = skipped = 0
ids = []
for case in cases:
    total += 1
    if case.find("skipped") is not None:
        skipped += 1
    elif case.find("failure") is not None or case.find("error") is not None:
        survived += 1
        ids.append(case.get("name", "").rsplit("#", 1)[-1])   # "Mutant #12"
killed = total - survived - skipped
tested = total - skipped
score = 100.0 * killed / tested if tested else float("nan")
print(f"{name}: {killed}/{tested} mutants killed ({score:.1f} %), {skipped} skipped, {secs} s")
for mid in ids:
    if mid.isdigit():
        diff = subprocess.run([f"{work}/.venv/bin/mutmut", "show", mid], cwd=work, capture_output=True, text=True)
        print(f"  survived #{mid}:")
        print("    " + "\n    ".join(line for line in diff.stdout.splitlines() if line.startswith(("-", "+"))
                                    and not line.startswith(("---", "+++"))))
with open(summary, "a") as fh:
    fh.write(f"{name}\t{module}\t{killed}\t{tested}\t{secs}\n")
PY
done

"$py" - "$summary" "$(( $(date +%s) - start ))" <<'PY'
import sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines() if line]
killed = sum(int(r[2]) for r in rows)
tested = sum(int(r[3]) for r in rows)
pct = 100.0 * killed / tested if tested else float("nan")
print(f"mutation score: {killed}/{tested} = {pct:.1f} % killed over {len(rows)} target(s) in {sys.argv[2]} s "
      f"(survivors above: kill them or list them as equivalent in docs/testing.md)")
PY
