#!/usr/bin/env bash
# Installs shellcheck from Debian when it is missing (idempotent): the kind script's
# --check needs it, and it is part of `make test`.
set -euo pipefail
command -v shellcheck >/dev/null && exit 0
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
if ! command -v apt-get >/dev/null; then
  echo "shellcheck is missing and this is not a Debian-like system: install it (https://www.shellcheck.net)" >&2
  exit 1
fi
"${as_root[@]}" apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq shellcheck >/dev/null
command -v shellcheck >/dev/null
