#!/usr/bin/env bash
# The README's path on a fresh clone: run the README's Install lines as written, then the main command
# through its installed console script from a folder outside the clone, and check it wrote its adapter.
# Usage: scripts/acceptance.sh [molex-train overrides...]   (default: experiment=smoke)
# Clones the committed HEAD into a temporary folder (removed at the end); prints the step's wall time.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

git clone -q "$repo" "$tmp/molex"
cd "$tmp/molex"
# the bash block of the README's "## Install" section, line by line, exactly as a reader copies it
sed -n '/^## Install/,/^## /p' README.md | awk '/^```bash/{inside=1; next} /^```/{inside=0} inside' >"$tmp/install.sh"
if [ ! -s "$tmp/install.sh" ]; then
  echo "acceptance: no bash block under '## Install' in README.md" >&2
  exit 1
fi
echo "acceptance: README install lines:" && sed 's/^/  /' "$tmp/install.sh"
if ! bash -euo pipefail "$tmp/install.sh" >"$tmp/install.log" 2>&1; then
  tail -n 40 "$tmp/install.log" >&2
  echo "acceptance: the README's install lines failed" >&2
  exit 1
fi
echo "acceptance: installed in $((SECONDS - start)) s"

mkdir "$tmp/work"
cd "$tmp/work"
run_start=$SECONDS
env -u PYTHONPATH "$tmp/molex/.venv/bin/molex-train" "${@:-experiment=smoke}" >"$tmp/train.log" 2>&1 || {
  tail -n 60 "$tmp/train.log" >&2
  echo "acceptance: molex-train failed" >&2
  exit 1
}
adapters=(outputs/train/*/*/adapter/adapter.safetensors)
if [ ! -f "${adapters[0]}" ] || [ ! -f "$(dirname "${adapters[0]}")/adapter_config.json" ]; then
  tail -n 60 "$tmp/train.log" >&2
  echo "acceptance: molex-train exited 0 but wrote no adapter under outputs/train/" >&2
  exit 1
fi
tail -n 3 "$tmp/train.log"
echo "acceptance: ok (molex-train $((SECONDS - run_start)) s, whole step $((SECONDS - start)) s)"
