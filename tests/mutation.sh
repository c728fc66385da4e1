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
#
# MUTATION_RESUME=1 with the same MUTATION_DIR keeps each target's mutmut cache and refreshes
# the rest of its copy from the checkout: mutmut then re-runs the surviving and untested mutants
# only (a killed mutant on an unchanged line stays killed), e.g. after adding tests that kill
# survivors or after an interrupted run.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PY:-$repo/.venv/bin/python}"
mutmut="$(dirname "$py")/mutmut"
if [ ! -x "$mutmut" ]; then
  echo "installing mutmut 2.5.1 into $(dirname "$(dirname "$py")") (not needed by anything else)"
  "$py" -m pip install -q "mutmut==2.5.1"
fi

# name|module[|functions left unmutated]|pytest arguments that select the tests that must kill
# its mutants (fast files first: with -x a killed mutant costs only the tests up to the first
# failure). Functions left unmutated get "# pragma: no mutate" on every line in the scratch
# copy; they are named in docs/testing.md with the tests that cover them instead.
# module::f,g mutates only the top-level functions f and g of the module (every other line
# gets the pragma): for a writer that lives in a larger module.
declare -A TARGET=(
  [lanczos]="hpcqml/hessian/lanczos.py|tests/test_mut_lanczos.py tests/test_lanczos_orthogonality.py tests/test_spectrum_exact_measure.py tests/test_mut_lanczos_mpi.py"
  [proxy]="hpcqml/hessian/proxy.py|tests/test_proxy.py tests/test_spectrum_exact_measure.py"
  [statevector]="hpcqml/hhl/statevector.py|tests/test_mut_statevector.py tests/test_hhl_closed_form.py tests/test_hhl.py"
  [timestepping]="hpcqml/carleman/timestepping.py|solve_ksp petsc_forward_iteration petsc_forward_iteration_t|tests/test_mut_timestepping.py tests/test_bounds_independent.py tests/test_fig4.py::test_fit_late_rate_recovers_an_exponential tests/test_fig4.py::test_growth_rate_matches_the_largest_divergent_mode[2-0] tests/test_fig4.py::test_all_dissipative_error_decays_at_the_slowest_mode[1-0] -k 'not stage'"
  [store]="hpcqml/store.py|tests/test_mut_store.py tests/test_store.py tests/test_store_atomic_commit.py"
  [writers]="hpcqml/stages/spectrum.py::_write_estimate,write_convention,result_writer|tests/test_mut_writers.py"
  [hhlcase]="hpcqml/hhl/case.py|tests/test_mut_hhl_case.py tests/test_sci_hhl_case.py"
)
names="${MUTATION_TARGETS:-lanczos proxy statevector timestepping store writers hhlcase}"
base="${MUTATION_DIR:-$(mktemp -d /tmp/hpcqml-mutation.XXXXXX)}"
mkdir -p "$base"
summary="$base/summary.tsv"
: >"$summary"
start=$(date +%s)

for name in $names; do
  spec="${TARGET[$name]:?unknown mutation target $name (one of ${!TARGET[*]})}"
  module="${spec%%|*}"
  tests="${spec#*|}"
  skip=""
  if [[ "$tests" == *"|"* ]]; then skip="${tests%%|*}"; tests="${tests#*|}"; fi
  only=""
  if [[ "$module" == *"::"* ]]; then only="${module#*::}"; only="${only//,/ }"; module="${module%%::*}"; fi
  work="$base/$name"
  kept="$base/.$name.mutmut-cache"   # where the cache waits while the copy is refreshed
  if [ "${MUTATION_RESUME:-0}" = 1 ] && [ -f "$work/.mutmut-cache" ]; then
    # the whole copy is refreshed from the checkout and only mutmut's cache is kept: mutmut
    # keys its results by line, so unchanged lines keep their result and edited lines are new
    echo "== $name: resuming in $work (copy refreshed from $repo, mutmut cache kept)"
    mv "$work/.mutmut-cache" "$kept"
  elif [ "${MUTATION_RESUME:-0}" = 1 ] && [ -f "$kept" ]; then
    echo "== $name: resuming in $work with the cache an interrupted refresh left in $kept"
  else
    if [ "${MUTATION_RESUME:-0}" = 1 ]; then echo "== $name: no mutmut cache in $work: a full run"; fi
    rm -f "$kept"
  fi
  rm -rf "$work"
  mkdir -p "$work"
  (cd "$repo" && tar --exclude=./.venv --exclude=./.git --exclude=./results --exclude='./*.h5' \
       --exclude=./.mutmut-cache -cf - .) | tar -xf - -C "$work"
  if [ -f "$kept" ]; then mv "$kept" "$work/.mutmut-cache"; fi
  ln -s "$(dirname "$(dirname "$py")")" "$work/.venv"
  if [ -n "$skip$only" ]; then
    "$py" - "$work/$module" "$skip" "$only" <<'PY'
import ast, io, sys, tokenize
path, skip, only = sys.argv[1], set(sys.argv[2].split()), set(sys.argv[3].split())
source = open(path).read()
lines = source.split("\n")
tree = ast.parse(source)
# lines that end inside a string literal (a comment there would become part of the string)
in_string = set()
for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
        in_string.update(range(tok.start[0], tok.end[0]))
spans = {}
for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        spans[node.name] = (min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno)
missing = (skip | only) - set(spans)
if missing:
    sys.exit(f"mutation.sh: no top-level function {sorted(missing)} in {path}")
if only:
    marked = set(range(1, len(lines) + 1)) - {i for name in only for i in range(spans[name][0], spans[name][1] + 1)}
else:
    marked = {i for name in skip for i in range(spans[name][0], spans[name][1] + 1)}
for i in sorted(marked):
    line = lines[i - 1]
    if line.strip() and i not in in_string and not line.rstrip().endswith("\\"):
        lines[i - 1] += "  # pragma: no mutate"
compile("\n".join(lines), path, "exec")   # still the same program
open(path, "w").write("\n".join(lines))
PY
    if [ -n "$skip" ]; then echo "   left unmutated in $module: $skip"; fi
    if [ -n "$only" ]; then echo "   mutated in $module: only $only"; fi
  fi
  echo "== $name: $module against $tests (copy in $work)"
  t0=$(date +%s)
  # mutmut 2.5.1 counts a mutant as killed only when the runner exits with status 1, but pytest
  # exits with 2 when a mutant cannot even be imported (a syntax error): that is a kill too.
  # pytest runs inside the process mutmut starts, so mutmut's timeout (10x the baseline) still
  # stops a mutant that loops. The script lives outside tests/, whose hash decides whether
  # mutmut re-runs its baseline: changing it alone does not re-run the survivors.
  printf '%s\n' "import sys" "import pytest" "rc = int(pytest.main(sys.argv[1:]))" \
    "sys.exit(1 if rc == 2 else rc)" >"$work/run_tests.py"
  runner="$work/.venv/bin/python $work/run_tests.py -x -q -p no:cacheprovider $tests"
  # the unmutated copy must pass first: with status 2 read as a kill, a copy that cannot even
  # import would otherwise count every mutant as killed (mutmut skips its own baseline run on
  # a resume when tests/ is unchanged); split as mutmut splits the runner (shlex)
  if ! (cd "$work" && OMP_NUM_THREADS=1 "$py" -c \
        'import shlex, subprocess, sys; sys.exit(subprocess.call(shlex.split(sys.argv[1])))' "$runner" \
        >"$work/baseline.log" 2>&1); then
    echo "mutation.sh: the tests of target $name fail without any mutant (see $work/baseline.log)" >&2
    exit 1
  fi
  (cd "$work" && OMP_NUM_THREADS=1 "$mutmut" run --paths-to-mutate "$module" --tests-dir tests \
       --runner "$runner" --no-progress \
       >"$work/mutmut.log" 2>&1) || true   # mutmut exits non-zero when mutants survive
  # mutants left untested (an interrupted run) count as skipped, not as killed; "suspicious"
  # ones (killed, but slowly) count as killed
  (cd "$work" && "$mutmut" junitxml --untested-policy=skipped >"$work/mutmut.xml" 2>/dev/null) || true
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
print(f"{name}: {killed}/{tested} mutants killed ({score:.1f} %), {skipped} untested, {secs} s")
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
