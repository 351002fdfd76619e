#!/usr/bin/env bash
# Fails when README.md, AGENTS.md or a plan note names a repository path (in backticks)
# that does not exist, so the docs cannot drift from the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for doc in README.md AGENTS.md plan/*.md tests/README.md deploy/README.md docs/*.md; do
  [ -f "$doc" ] || continue
  # Backticked tokens that start with a top-level directory or file of this repository.
  # shellcheck disable=SC2016 # the backticks are the pattern, not an expansion
  while read -r path; do
    path=${path%%:*}          # drop ":line" suffixes
    path=${path%/}
    [ -e "$path" ] || { echo "$doc: \`$path\` does not exist"; status=1; }
  done < <(grep -oE '`(proto|service|filter|fuzz|tests|deploy|wasmplugin|plan|scripts|docs|\.ci)/[A-Za-z0-9_./{},-]*`' "$doc" \
            | tr -d '`' | grep -v '[{}*]' | sort -u)
done
exit $status
