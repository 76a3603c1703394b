#!/usr/bin/env bash
# Does the working tree export the same bundle as an earlier commit? Exports one preset twice, with the package
# at REV (a temporary git worktree, put on PYTHONPATH as medblip_edge through a symlink) and with the package as
# installed here, and compares every file but manifest.json by SHA-256. Presets are seeded, so equal hashes mean
# the graphs, weights and tokenizer are byte for byte the same and every speed and size measured on one holds
# for the other.
#
#   bash benchmarks/same_export.sh REV PRESET OUT [medblip-export options...]
#   bash benchmarks/same_export.sh 832ce57 small /tmp/same --llm-quant int4 --precision int8
#
# Writes OUT/old/, OUT/new/ (the bundles), OUT/old.sha256, OUT/new.sha256 and the two exports' logs; prints
# `same: N files` (exit 0) or the differing files (exit 1). Run from the repository root with the project's
# virtual environment active.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,13p "$0"; exit 2; fi
rev=$1 preset=$2 out=$3
shift 3
python=$(command -v python)
repo=$(git rev-parse --show-toplevel)
mkdir -p "$out"
out=$(cd "$out" && pwd)
tree=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$tree/src" >/dev/null 2>&1 || true; rm -rf "$tree"' EXIT
git -C "$repo" worktree add --detach "$tree/src" "$rev" >/dev/null 2>&1
mkdir "$tree/path"
ln -s "$tree/src" "$tree/path/medblip_edge"
rm -rf "$out/old" "$out/new"
(cd "$tree" && PYTHONPATH="$tree/path" "$python" -m medblip_edge.cli_export --preset "$preset" "$@" \
    --out "$out/old") > "$out/old.log" 2>&1
(cd "$tree" && "$python" -m medblip_edge.cli_export --preset "$preset" "$@" --out "$out/new") > "$out/new.log" 2>&1
for side in old new; do
    (cd "$out/$side" && find . -type f ! -name manifest.json | LC_ALL=C sort | xargs sha256sum) > "$out/$side.sha256"
done
if diff "$out/old.sha256" "$out/new.sha256" > "$out/diff.txt"; then
    echo "same: $(wc -l < "$out/new.sha256") files ($rev and the working tree, --preset $preset $*)"
else
    echo "different ($rev and the working tree, --preset $preset $*):"
    cat "$out/diff.txt"
    exit 1
fi
