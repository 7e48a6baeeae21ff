#!/usr/bin/env bash
# Type check (mypy, pinned in constraints.txt; config in pyproject.toml [tool.mypy]).
#
# The folders pipeline/, trainers/ and jobs/ install as selfsup.pipeline, selfsup.trainers and
# selfsup.jobs (pyproject's package-dir), which mypy cannot follow. So this builds the installed
# layout from symlinks, build/typecheck/selfsup/{__init__.py,pipeline,trainers,jobs}, checks it
# there (all three packages), and prints errors with repository paths (pipeline/feed.py, not
# selfsup/pipeline/feed.py). The cache lives in build/typecheck/.mypy_cache.
#
# Usage: bash tests/typecheck.sh [extra mypy arguments]   (`make typecheck`; CI runs it)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
tree="$root/build/typecheck"
mkdir -p "$tree/selfsup"
ln -sfn "$root/selfsup/__init__.py" "$tree/selfsup/__init__.py"
for pkg in pipeline trainers jobs; do
    ln -sfn "$root/$pkg" "$tree/selfsup/$pkg"
done
cd "$tree"
"$py" -m mypy --config-file "$root/pyproject.toml" -p selfsup.pipeline -p selfsup.trainers -p selfsup.jobs "$@" 2>&1 \
    | sed -E 's#^selfsup/(pipeline|trainers|jobs)/#\1/#'
