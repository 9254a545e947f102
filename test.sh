#!/usr/bin/env bash
# Run the whole test suite: lint, types, then every test (real registries, real disks).
#   ./test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")"

./install.sh --no-demo
.venv/bin/ruff check src tests tools bench
.venv/bin/mypy src
.venv/bin/lint-imports

# pytest's own temporary root, removed here: pytest's clean-up of old roots in the shared
# /tmp/pytest-of-USER recurses per directory level and dies on a deep tree another run left.
base=$(mktemp -d "${TMPDIR:-/tmp}/microagent-tests.XXXXXX")
trap 'rm -rf "$base"' EXIT

set +e
.venv/bin/pytest -q -p no:cacheprovider --basetemp "$base/pytest" "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
