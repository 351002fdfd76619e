#!/usr/bin/env bash
# Packages tokensmith_filter.wasm as an OCI image layout that Istio's WasmPlugin fetcher
# accepts: an OCI image whose single application/vnd.oci.image.layer.v1.tar+gzip layer
# holds `plugin.wasm`. Reproducible (fixed tar metadata, gzip -n): same .wasm, same digest.
#
#   wasmplugin/package.sh WASM OUT_DIR [TAG]
#   skopeo copy oci:OUT_DIR:TAG docker://REGISTRY/tokensmith-filter:TAG
#   # or: oras cp --from-oci-layout OUT_DIR:TAG REGISTRY/tokensmith-filter:TAG
#
# Or the build context of wasmplugin/Dockerfile, holding plugin.wasm and nothing else:
#   wasmplugin/package.sh --docker-context WASM DIR
#   docker build -f wasmplugin/Dockerfile -t REGISTRY/tokensmith-filter:TAG DIR
set -euo pipefail
if [ "${1:-}" = --docker-context ]; then
  [ $# -eq 3 ] || { echo "usage: $0 --docker-context WASM DIR" >&2; exit 64; }
  [ -f "$2" ] || { echo "$2: no such file (run make build)" >&2; exit 1; }
  rm -rf "$3"
  mkdir -p "$3"
  cp "$2" "$3/plugin.wasm"
  exit 0
fi
[ $# -ge 2 ] || { echo "usage: $0 WASM OUT_DIR [TAG] | --docker-context WASM DIR" >&2; exit 64; }
wasm=$1 out=$2 tag=${3:-0.1.0}
[ -f "$wasm" ] || { echo "$wasm: no such file (run make build)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
mkdir -p "$out/blobs/sha256"

# blob FILE → prints "sha256:<hex> <size>" and stores the file under blobs/.
blob() {
  local hex size
  hex=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  cp "$1" "$out/blobs/sha256/$hex"
  echo "sha256:$hex $size"
}

cp "$wasm" "$work/plugin.wasm"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work" -cf "$work/layer.tar" plugin.wasm
diff_id=sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$work/layer.tar" > "$work/layer.tar.gz"
read -r layer_digest layer_size < <(blob "$work/layer.tar.gz")

printf '{"architecture":"wasm","os":"wasip1","rootfs":{"type":"layers","diff_ids":["%s"]}}' "$diff_id" > "$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.title":"plugin.wasm"}}],"annotations":{"org.opencontainers.image.title":"tokensmith-filter"}}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$tag" > "$out/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
echo "$manifest_digest"
