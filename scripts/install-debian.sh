#!/usr/bin/env bash
# Installs Debian packages whose command is missing (idempotent), for targets that need
# them: `install-debian.sh COMMAND[:PACKAGE]...` (PACKAGE defaults to COMMAND).
# Used for shellcheck (make lint, the kind script's --check) and wrk (make bench).
set -euo pipefail
missing=()
for wanted in "$@"; do
  command -v "${wanted%%:*}" >/dev/null || missing+=("${wanted#*:}")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
if ! command -v apt-get >/dev/null; then
  echo "missing ${missing[*]} and this is not a Debian-like system: install them yourself" >&2
  exit 1
fi
"${as_root[@]}" apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
for wanted in "$@"; do
  command -v "${wanted%%:*}" >/dev/null
done
