#!/usr/bin/env bash
# Tokensmith end to end in two real kind clusters, on a workstation with Docker.
#
#   tests/kind/kind-e2e.sh               every phase; deletes the clusters when it passes
#   tests/kind/kind-e2e.sh --keep        the same, and keeps the clusters afterwards
#   tests/kind/kind-e2e.sh --teardown    deletes the clusters (and the registry this script made)
#   tests/kind/kind-e2e.sh --render DIR  offline: every manifest a run applies, one file per apply
#   tests/kind/kind-e2e.sh --check       offline (CI): shellcheck, --render, validate-manifests
#
# Two clusters, because one cannot prove the swap: a workload token is only worth something
# to the cluster that issued it. deploy/README.md ("End to end in kind") walks through it.
set -euo pipefail
set -o errtrace # the ERR trap fires inside functions too
# A failure inside $(...) fails the substitution too (bash >= 4.4).
shopt -s inherit_errexit 2>/dev/null || true

# ---- pinned versions; each can be overridden from the environment -----------------------
# kind v0.29.0 is the newest kind release whose notes still list a Kubernetes 1.30 image
# (v0.30.0 and later start at 1.31). Node images are pinned exactly as its notes list them;
# 1.33 is the newest of that release, and the newest Istio 1.27 supports.
KIND_VERSION=${KIND_VERSION:-v0.29.0}
KIND_NODE_IMAGE_1_30=${KIND_NODE_IMAGE_1_30:-kindest/node:v1.30.13@sha256:397209b3d947d154f6641f2d0ce8d473732bd91c87d9575ade99049aa33cd648}
KIND_NODE_IMAGE_1_33=${KIND_NODE_IMAGE_1_33:-kindest/node:v1.33.1@sha256:050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f}
K8S_VERSION=${K8S_VERSION:-1.30} # 1.30 (the minimum deploy/ supports) or 1.33
ISTIO_VERSION=${ISTIO_VERSION:-1.27.9}
# Images the test pods run. Tags only where no digest could be checked offline; kubectl
# follows the node's minor version (kubectl's skew policy).
KUBECTL_IMAGE_1_30=${KUBECTL_IMAGE_1_30:-registry.k8s.io/kubectl:v1.30.14}
KUBECTL_IMAGE_1_33=${KUBECTL_IMAGE_1_33:-registry.k8s.io/kubectl:v1.33.1}
REGISTRY_IMAGE=${REGISTRY_IMAGE:-registry:2.8.3@sha256:a3d8aaa63ed8681a604f1dea0aa03f100d5895b6a58ace528858a7b332415373}
GRPCURL_IMAGE=${GRPCURL_IMAGE:-fullstorydev/grpcurl:v1.9.3}
ECHO_IMAGE=${ECHO_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.53}

# ---- names, ports, paths ------------------------------------------------------------------
WORKLOAD=tokensmith-workload
MANAGEMENT=tokensmith-management
KIND_NETWORK=kind
REGISTRY_NAME=kind-registry
REGISTRY_HOST_PORT=${REGISTRY_HOST_PORT:-5001}
GATEWAY_NODE_PORT=30443
GATEWAY_HOST_PORT=${GATEWAY_HOST_PORT:-18443}
MGMT_HOST='mgmt-api.example.com'
OTHER_HOST='other.example.com'
COMPANION_IMAGE=tokensmith:kind
COMPANION_SELECTOR=app.kubernetes.io/name=tokensmith,app.kubernetes.io/component=authz
FILTER_REPO=tokensmith-filter
FILTER_TAG=0.1.0
ESO_MARKER=tokensmith-e2e-marker
ESO_USER=system:serviceaccount:app-prod:eso-sa
REVIEWER_TOKEN_DURATION=${REVIEWER_TOKEN_DURATION:-24h}
SSR_PATH=/apis/authentication.k8s.io/v1/selfsubjectreviews
SSR_BODY='{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}'

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/../.." && pwd)
WORK=$ROOT/target/kind-e2e # kubeconfig, credentials, certificates: git-ignored
KUBECONFIG_FILE=$WORK/kubeconfig
HTTP_BODY=$WORK/http/body
HTTP_HEADERS=$WORK/http/headers
MODE=run KEEP=0 RENDER_DIR='' FAILED_AT=''
CLEANUP=()

usage() { sed -n '2,8p' "$SELF" | sed 's/^# \{0,1\}//'; }

# ---- output -------------------------------------------------------------------------------
step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
  FAILED_AT=$*
  printf '\nFAIL: %s\n' "$*" >&2
  exit 1
}
# Anything shaped like a JWT, or a base64url run of 64+ characters, as the companion does.
redact() { sed -E 's/eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*/[redacted]/g; s/[A-Za-z0-9_-]{64,}/[redacted]/g'; }

# ---- cluster access: a kubeconfig of our own, so ~/.kube/config is never touched ---------
kube() {
  local cluster=$1
  shift
  kubectl --kubeconfig "$KUBECONFIG_FILE" --context "kind-$cluster" "$@"
}
kw() { kube "$WORKLOAD" "$@"; }
km() { kube "$MANAGEMENT" "$@"; }
ictl() { istioctl --kubeconfig "$KUBECONFIG_FILE" --context "kind-$MANAGEMENT" "$@"; }
# kustomize and --dry-run=client need no cluster; /dev/null proves it.
offline_kubectl() { KUBECONFIG=/dev/null kubectl "$@"; }
# dry_run ARGS...: `kubectl create ARGS` as YAML, without the `creationTimestamp: null`
# that a strict round trip (validate-manifests) would count as a lost field.
dry_run() { offline_kubectl create "$@" --dry-run=client -o yaml | sed '/^  creationTimestamp: null$/d'; }

# emit NAME CLUSTER: the manifest on stdin is one apply. --render keeps it as DIR/NAME.yaml,
# a run applies exactly that text (so what --check validates is what the clusters get).
emit() {
  local name=$1 cluster=$2
  if [ -n "$RENDER_DIR" ]; then
    cat >"$RENDER_DIR/$name.yaml"
  else
    note "apply $name"
    kube "$cluster" apply -f - | sed 's/^/      /'
  fi
}

# wait_until SECONDS WHAT COMMAND...: polls a condition every 2 s, fails with WHAT.
wait_until() {
  local timeout=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${timeout}s waiting for: $what"
    sleep 2
  done
}

cluster_exists() {
  local list
  list=$(kind get clusters 2>/dev/null) || return 1
  grep -qx "$1" <<<"$list"
}

select_versions() {
  case $K8S_VERSION in
  1.30) NODE_IMAGE=$KIND_NODE_IMAGE_1_30 KUBECTL_IMAGE=$KUBECTL_IMAGE_1_30 ;;
  1.33) NODE_IMAGE=$KIND_NODE_IMAGE_1_33 KUBECTL_IMAGE=$KUBECTL_IMAGE_1_33 ;;
  *) die "K8S_VERSION=$K8S_VERSION: use 1.30 or 1.33 (the kind $KIND_VERSION node images pinned in $SELF)" ;;
  esac
}

# ---- tools --------------------------------------------------------------------------------
MISSING=()
need() { command -v "$1" >/dev/null 2>&1 || MISSING+=("$1 — $2"); }
report_missing() {
  [ "${#MISSING[@]}" -eq 0 ] && return 0
  printf 'missing tools:\n' >&2
  printf '  %s\n' "${MISSING[@]}" >&2
  FAILED_AT="missing tools"
  exit 1
}

preflight_run() {
  step "tools"
  need docker "https://docs.docker.com/engine/install/"
  need kind "$KIND_VERSION: go install sigs.k8s.io/kind@$KIND_VERSION, or https://github.com/kubernetes-sigs/kind/releases/tag/$KIND_VERSION"
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  need istioctl "$ISTIO_VERSION: curl -L https://istio.io/downloadIstio | ISTIO_VERSION=$ISTIO_VERSION sh -  (then add istio-$ISTIO_VERSION/bin to PATH)"
  need openssl "your package manager (apt-get install openssl)"
  need jq "apt-get install jq, or https://jqlang.org/download/"
  need curl "apt-get install curl"
  need make "apt-get install make"
  need cargo "https://rustup.rs (make wasmplugin builds the filter)"
  if ! command -v skopeo >/dev/null 2>&1 && ! command -v crane >/dev/null 2>&1; then
    MISSING+=("skopeo or crane — apt-get install skopeo, or go install github.com/google/go-containerregistry/cmd/crane@latest")
  fi
  report_missing
  docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (docker info)"
  local v
  v=$(kind version | awk '{print $2}')
  [ "$v" = "$KIND_VERSION" ] || die "kind is $v, this test pins $KIND_VERSION (its node images are built for it): https://github.com/kubernetes-sigs/kind/releases/tag/$KIND_VERSION"
  v=$(istioctl version --remote=false 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true)
  [ "$v" = "$ISTIO_VERSION" ] || die "istioctl is ${v:-unknown}, this test pins $ISTIO_VERSION: curl -L https://istio.io/downloadIstio | ISTIO_VERSION=$ISTIO_VERSION sh -"
  PUSHER=skopeo
  command -v skopeo >/dev/null 2>&1 || PUSHER=crane
  ok "kind $KIND_VERSION, istioctl $ISTIO_VERSION, Kubernetes $K8S_VERSION ($NODE_IMAGE), push with $PUSHER"
}

# ---- manifests (stdout); live values come from the run steps, or from use_placeholders ------
# app-prod/eso-sa: the workload's identity, and in management its twin that RBAC grants.
m_eso_identity() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: app-prod
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: eso-sa
  namespace: app-prod
EOF
}

m_workload_identities() {
  m_eso_identity
  cat <<EOF
---
# Exists in the workload cluster only: the companion must answer 403.
apiVersion: v1
kind: ServiceAccount
metadata:
  name: workload-only
  namespace: app-prod
EOF
}

write_istio_overlay() {
  mkdir -p "$OVERLAY_DIR/istio"
  # kustomize loads files from inside its root only: a copy of the shipped mesh config.
  cp "$ROOT/deploy/istio/mesh-config/istio-operator.yaml" "$OVERLAY_DIR/istio/istio-operator.yaml"
  cat >"$OVERLAY_DIR/istio/kustomization.yaml" <<EOF
# Generated by tests/kind/kind-e2e.sh: deploy/istio/mesh-config/istio-operator.yaml plus
# what kind needs. An IstioOperator has no schema here, so lists are replaced, maps merged.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- istio-operator.yaml
patches:
- target:
    kind: IstioOperator
    name: tokensmith-provider
  patch: |-
    apiVersion: install.istio.io/v1alpha1
    kind: IstioOperator
    metadata:
      name: tokensmith-provider
    spec:
      meshConfig:
        # The gateway's access log names status and response flags of each request.
        accessLogFile: /dev/stdout
      components:
        # tokensmith-system enforces Pod Security "restricted": only with Istio CNI does the
        # injected sidecar need no NET_ADMIN/NET_RAW init container (deploy/namespace.yaml).
        cni:
          enabled: true
        ingressGateways:
        - name: istio-ingressgateway
          enabled: true
          k8s:
            # No load balancer in kind: a fixed NodePort that the kind config maps to the host.
            service:
              type: NodePort
              ports:
              - name: status-port
                port: 15021
                targetPort: 15021
              - name: https
                port: 443
                targetPort: 8443
                nodePort: $GATEWAY_NODE_PORT
            env:
            # istio-agent in the gateway pod fetches the WasmPlugin module itself; the kind
            # registry speaks plain HTTP.
            - name: WASM_INSECURE_REGISTRIES
              value: $REGISTRY_NAME:5000
            podAnnotations:
              # Istio trims Envoy's stats; ext_authz counters help read a failure.
              proxy.istio.io/config: |
                proxyStatsMatcher:
                  inclusionRegexps: [".*ext_authz.*"]
EOF
}
m_istio_operator() {
  write_istio_overlay
  offline_kubectl kustomize "$OVERLAY_DIR/istio"
}

m_management_identities() {
  m_eso_identity
  cat <<EOF
---
apiVersion: v1
kind: Secret
metadata:
  name: eso-secret
  namespace: app-prod
type: Opaque
stringData:
  marker: $ESO_MARKER
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: eso-secret-reader
  namespace: app-prod
rules:
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: ["eso-secret"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: eso-secret-reader
  namespace: app-prod
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: eso-secret-reader
subjects:
- kind: ServiceAccount
  name: eso-sa
  namespace: app-prod
EOF
}

# The companion's view of the workload cluster (deploy/README.md step 2): reachable from
# management pods at the control-plane container's address on the kind network.
write_workload_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: workload
  cluster:
    server: https://$WORKLOAD_API_IP:6443
    certificate-authority-data: $WORKLOAD_CA_DATA
users:
- name: tokensmith-reviewer
  user:
    tokenFile: token
contexts:
- name: workload
  context:
    cluster: workload
    user: tokensmith-reviewer
current-context: workload
EOF
}
m_workload_kubeconfig_secret() {
  dry_run -n tokensmith-system secret generic tokensmith-workload-kubeconfig \
    --from-file=kubeconfig="$WORKLOAD_KUBECONFIG" --from-file=token="$REVIEWER_TOKEN"
}

# deploy/ as shipped, with the real API-server addresses, the kind image and the app-prod
# binding of token-namespaces.yaml (kept: it is part of deploy/). `test` ops fail the
# render if the placeholders move.
write_companion_overlay() {
  mkdir -p "$OVERLAY_DIR/companion"
  cat >"$OVERLAY_DIR/companion/kustomization.yaml" <<EOF
# Generated by tests/kind/kind-e2e.sh.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- ../../../deploy
patches:
# kindnetd enforces NetworkPolicy since kind v0.24.0 (sigs.k8s.io/kube-network-policies),
# so these addresses are live here: a wrong one leaves the companion unready.
- target:
    kind: NetworkPolicy
    name: tokensmith
  patch: |-
    - op: test
      path: /spec/egress/2/to/0/ipBlock/cidr
      value: 192.0.2.1/32
    - op: replace
      path: /spec/egress/2/to/0/ipBlock/cidr
      value: $MGMT_API_IP/32
    - op: replace
      path: /spec/egress/2/ports/0/port
      value: $MGMT_API_PORT
    - op: test
      path: /spec/egress/3/to/0/ipBlock/cidr
      value: 192.0.2.2/32
    - op: replace
      path: /spec/egress/3/to/0/ipBlock/cidr
      value: $WORKLOAD_API_IP/32
    - op: replace
      path: /spec/egress/3/ports/0/port
      value: 6443
- target:
    kind: Deployment
    name: tokensmith
  patch: |-
    - op: test
      path: /spec/template/spec/containers/0/name
      value: tokensmith
    - op: replace
      path: /spec/template/spec/containers/0/image
      value: $COMPANION_IMAGE
    # A rebuilt image under the same tag rolls the pods on a re-run.
    - op: add
      path: /spec/template/metadata/annotations/tokensmith.io~1image-id
      value: "$COMPANION_IMAGE_ID"
EOF
}
m_companion() {
  write_companion_overlay
  offline_kubectl kustomize "$OVERLAY_DIR/companion"
}

# The two Secrets deploy/istio/example-route.yaml names (deploy/README.md step 6).
m_gateway_tls() {
  dry_run -n istio-system secret generic mgmt-api-tls --type=kubernetes.io/tls \
    --from-file=tls.crt="$GATEWAY_CRT" --from-file=tls.key="$GATEWAY_KEY"
  echo ---
  dry_run -n istio-system secret generic kube-apiserver-ca --from-file=ca.crt="$APISERVER_CA"
}

# A second application on the same gateway and port: the exchange must leave it alone.
m_other_host() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: echo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: echo
spec:
  replicas: 1
  selector:
    matchLabels:
      app: echo
  template:
    metadata:
      labels:
        app: echo
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
      - name: echo
        image: $ECHO_IMAGE
        command: ["/agnhost", "netexec", "--http-port=8080"]
        ports:
        - containerPort: 8080
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop: ["ALL"]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: echo
spec:
  selector:
    app: echo
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: other
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 443
      name: https-other
      protocol: HTTPS
    hosts: ["$OTHER_HOST"]
    tls:
      mode: SIMPLE
      credentialName: mgmt-api-tls
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: other
  namespace: istio-system
spec:
  hosts: ["$OTHER_HOST"]
  gateways: ["other"]
  http:
  - route:
    - destination:
        host: echo.echo.svc.cluster.local
        port:
          number: 80
EOF
}

# kubectl's --tls-server-name sets only the SNI; the Host header follows --server. The
# gateway routes by Host, so the Job reaches the NodePort under the real name through a
# hostAlias, and verifies the gateway's certificate with the test CA (no insecure skip).
write_client_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: management-via-gateway
  cluster:
    server: https://$MGMT_HOST:$GATEWAY_NODE_PORT
    certificate-authority: /etc/mgmt-api/ca.crt
users:
- name: eso-sa
  user:
    # The pod's own projected token (default audience), read fresh by kubectl.
    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
contexts:
- name: management
  context:
    cluster: management-via-gateway
    user: eso-sa
current-context: management
EOF
}
m_client_config() {
  dry_run -n app-prod configmap mgmt-api-client \
    --from-file=kubeconfig="$CLIENT_KUBECONFIG" --from-file=ca.crt="$GATEWAY_CA"
}

# client_container NAME ARGS...: kubectl against the management API through the gateway.
client_container() {
  local name=$1 arg
  shift
  cat <<EOF
      - name: $name
        image: $KUBECTL_IMAGE
        command: ["/bin/kubectl"]
        args:
        - --kubeconfig=/etc/mgmt-api/kubeconfig
        - --cache-dir=/tmp/kube-cache
        - --request-timeout=20s
EOF
  for arg in "$@"; do printf '        - "%s"\n' "$arg"; done
  cat <<EOF
        env:
        - name: HOME
          value: /tmp
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: ["ALL"]
        volumeMounts:
        - name: mgmt-api
          mountPath: /etc/mgmt-api
          readOnly: true
        - name: tmp
          mountPath: /tmp
EOF
}
m_client_job() {
  cat <<EOF
# The workload as ESO would run: app-prod/eso-sa with its own token, reading its Secret in
# the management cluster through the gateway. No retries: the first attempt must work.
apiVersion: batch/v1
kind: Job
metadata:
  name: $1
  namespace: app-prod
  labels:
    app.kubernetes.io/name: tokensmith-e2e-client
spec:
  backoffLimit: 0
  activeDeadlineSeconds: 300
  template:
    metadata:
      labels:
        app.kubernetes.io/name: tokensmith-e2e-client
    spec:
      serviceAccountName: eso-sa
      restartPolicy: Never
      hostAliases:
      - ip: "$MGMT_NODE_IP"
        hostnames: ["$MGMT_HOST"]
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile:
          type: RuntimeDefault
      initContainers:
EOF
  client_container read-secret --namespace=app-prod get secret eso-secret -o 'jsonpath={.data.marker}'
  echo "      containers:"
  client_container whoami auth whoami -o json
  cat <<EOF
      volumes:
      - name: mgmt-api
        configMap:
          name: mgmt-api-client
      - name: tmp
        emptyDir: {}
EOF
}

# A pod outside the mesh, in namespace default, asking the companion for a token directly.
# With the protos a reachable companion would answer (exit 0), so failure means refused.
m_direct_caller() {
  local files=() items="" f rel key
  for f in "$ROOT"/proto/proto/envoy/*/*/v3/*.proto "$ROOT"/proto/proto/envoy/*/v3/*.proto "$ROOT"/proto/proto/google/rpc/*.proto; do
    [ -f "$f" ] || continue
    rel=${f#"$ROOT"/proto/proto/}
    key=${rel//\//.}
    files+=("--from-file=$key=$f")
    items+="          - key: $key"$'\n'"            path: $rel"$'\n'
  done
  items=${items%$'\n'}
  dry_run -n default configmap tokensmith-protos "${files[@]}"
  cat <<EOF
---
apiVersion: v1
kind: Pod
metadata:
  name: tokensmith-direct-caller
  namespace: default
  labels:
    app.kubernetes.io/name: tokensmith-e2e-direct-caller
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
  - name: grpcurl
    image: $GRPCURL_IMAGE
    command: ["/bin/grpcurl"]
    args: ["-plaintext", "-connect-timeout", "5", "-max-time", "10",
           "-import-path", "/protos", "-proto", "envoy/service/auth/v3/external_auth.proto",
           "-d", "{}", "tokensmith.tokensmith-system.svc.cluster.local:9001",
           "envoy.service.auth.v3.Authorization/Check"]
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: ["ALL"]
    volumeMounts:
    - name: protos
      mountPath: /protos
      readOnly: true
  volumes:
  - name: protos
    configMap:
      name: tokensmith-protos
      items:
$items
EOF
}

# wasmplugin/wasmplugin.yaml as shipped, pinned by digest to the module just pushed.
m_wasmplugin() {
  local src=$ROOT/wasmplugin/wasmplugin.yaml
  [ "$(grep -c '^  url: ' "$src")" = 1 ] || die "$src: expected one '  url:' line to replace"
  sed "s|^  url: .*|  url: oci://$REGISTRY_NAME:5000/$FILTER_REPO@$WASM_DIGEST|" "$src"
}

# ---- the applies, named once: --render writes them in this order -------------------------
apply_workload_reviewer() { offline_kubectl kustomize "$ROOT/deploy/workload-cluster" | emit 01-workload-reviewer "$WORKLOAD"; }
apply_workload_identities() { m_workload_identities | emit 02-workload-identities "$WORKLOAD"; }
# istioctl, not kubectl, consumes 03: see install_istio.
render_istio_operator() { m_istio_operator >"$1"; }
apply_management_identities() { m_management_identities | emit 04-management-identities "$MANAGEMENT"; }
apply_namespace() { emit 05-management-namespace "$MANAGEMENT" <"$ROOT/deploy/namespace.yaml"; }
apply_workload_kubeconfig() { m_workload_kubeconfig_secret | emit 06-management-workload-kubeconfig "$MANAGEMENT"; }
apply_companion() { m_companion | emit 07-management-companion "$MANAGEMENT"; }
apply_gateway_tls() { m_gateway_tls | emit 08-management-gateway-tls "$MANAGEMENT"; }
apply_istio_policies() { offline_kubectl kustomize "$ROOT/deploy/istio" | emit 09-management-istio-policies "$MANAGEMENT"; }
# Applied as shipped: the host is mgmt-api.example.com and both Secrets exist (08).
apply_example_route() { emit 10-management-example-route "$MANAGEMENT" <"$ROOT/deploy/istio/example-route.yaml"; }
apply_other_host() { m_other_host | emit 11-management-other-host "$MANAGEMENT"; }
apply_client_config() { m_client_config | emit 12-workload-client-config "$WORKLOAD"; }
apply_client_job_custom() { m_client_job tokensmith-e2e-client-custom | emit 13-workload-client-job-custom "$WORKLOAD"; }
apply_direct_caller() { m_direct_caller | emit 14-management-direct-caller "$MANAGEMENT"; }
apply_wasmplugin() { m_wasmplugin | emit 15-management-wasmplugin "$MANAGEMENT"; }
apply_client_job_wasm() { m_client_job tokensmith-e2e-client-wasm | emit 16-workload-client-job-wasm "$WORKLOAD"; }

# Documentation addresses (TEST-NET-3) and dummy bytes where a run has live data.
use_placeholders() {
  local ph
  ph=$(mktemp -d)
  mkdir -p "$ROOT/target"
  OVERLAY_DIR=$(mktemp -d "$ROOT/target/kind-overlay.render.XXXXXX")
  CLEANUP+=("$ph" "$OVERLAY_DIR")
  WORKLOAD_API_IP=203.0.113.10 MGMT_NODE_IP=203.0.113.20 MGMT_API_IP=203.0.113.20 MGMT_API_PORT=6443
  WASM_DIGEST=sha256:$(printf '%064d' 0)
  COMPANION_IMAGE_ID=sha256:placeholder-image-id
  WORKLOAD_CA_DATA=cGxhY2Vob2xkZXIgd29ya2xvYWQgQ0E= # base64("placeholder workload CA")
  REVIEWER_TOKEN=$ph/token GATEWAY_CA=$ph/ca.crt GATEWAY_CRT=$ph/tls.crt GATEWAY_KEY=$ph/tls.key
  APISERVER_CA=$ph/apiserver-ca.crt
  printf 'placeholder-reviewer-token' >"$REVIEWER_TOKEN"
  for f in "$GATEWAY_CA" "$GATEWAY_CRT" "$GATEWAY_KEY" "$APISERVER_CA"; do printf 'placeholder PEM\n' >"$f"; done
  WORKLOAD_KUBECONFIG=$ph/kubeconfig CLIENT_KUBECONFIG=$ph/client-kubeconfig
  write_workload_kubeconfig "$WORKLOAD_KUBECONFIG"
  write_client_kubeconfig "$CLIENT_KUBECONFIG"
}

render() {
  command -v kubectl >/dev/null 2>&1 || die "--render needs kubectl (for kubectl kustomize): https://kubernetes.io/docs/tasks/tools/"
  mkdir -p "$1"
  RENDER_DIR=$(cd "$1" && pwd)
  rm -f "$RENDER_DIR"/[0-9][0-9]-*.yaml
  select_versions
  use_placeholders
  apply_workload_reviewer
  apply_workload_identities
  render_istio_operator "$RENDER_DIR/03-management-istio-operator.yaml"
  apply_management_identities
  apply_namespace
  apply_workload_kubeconfig
  apply_companion
  apply_gateway_tls
  apply_istio_policies
  apply_example_route
  apply_other_host
  apply_client_config
  apply_client_job_custom
  apply_direct_caller
  apply_wasmplugin
  apply_client_job_wasm
  ls "$RENDER_DIR"
}

check() {
  command -v shellcheck >/dev/null 2>&1 ||
    die "--check needs shellcheck: apt-get install shellcheck (https://github.com/koalaman/shellcheck#installing)"
  shellcheck -x "$SELF"
  local dir f
  dir=$(mktemp -d)
  CLEANUP+=("$dir")
  render "$dir" >/dev/null
  # 03 is istioctl's input, not an object of the cluster: Istio 1.27 ships no IstioOperator
  # CRD to check it against (istioctl install validates it). Every kubectl apply is checked.
  local files=()
  for f in "$dir"/*.yaml; do
    [ "$(basename "$f")" = 03-management-istio-operator.yaml ] || files+=("$f")
  done
  cd "$ROOT"
  cargo run -q --locked -p tokensmith-tests --bin validate-manifests -- "${files[@]}"
}

# ---- run: clusters -------------------------------------------------------------------------
write_kind_config() {
  local file=$WORK/kind-$1.yaml
  cat >"$file" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: $1
nodes:
- role: control-plane
  image: $NODE_IMAGE
EOF
  if [ "$1" = "$MANAGEMENT" ]; then
    cat >>"$file" <<EOF
  # The gateway's HTTPS NodePort, for this script's curl on the host.
  extraPortMappings:
  - containerPort: $GATEWAY_NODE_PORT
    hostPort: $GATEWAY_HOST_PORT
    listenAddress: "127.0.0.1"
    protocol: TCP
EOF
  fi
}

ensure_cluster() {
  local v mapped
  if cluster_exists "$1"; then
    note "reusing cluster $1"
    kind export kubeconfig --name "$1" --kubeconfig "$KUBECONFIG_FILE" >/dev/null
  else
    write_kind_config "$1"
    kind create cluster --config "$WORK/kind-$1.yaml" --kubeconfig "$KUBECONFIG_FILE" --wait 180s
  fi
  v=$(kube "$1" get nodes -o jsonpath='{.items[0].status.nodeInfo.kubeletVersion}')
  case $v in v"$K8S_VERSION".*) ;; *) die "cluster $1 runs $v but K8S_VERSION=$K8S_VERSION: $SELF --teardown first" ;; esac
  if [ "$1" = "$MANAGEMENT" ]; then
    mapped=$(docker port "$1-control-plane" "$GATEWAY_NODE_PORT/tcp" 2>/dev/null || true)
    [[ $mapped == *":$GATEWAY_HOST_PORT"* ]] ||
      die "cluster $1 maps the gateway to '${mapped:-nothing}', not 127.0.0.1:$GATEWAY_HOST_PORT: $SELF --teardown first"
  fi
}

node_ip() { docker inspect -f "{{(index .NetworkSettings.Networks \"$KIND_NETWORK\").IPAddress}}" "$1-control-plane"; }

create_clusters() {
  step "clusters $WORKLOAD and $MANAGEMENT on the Docker network '$KIND_NETWORK'"
  # Both clusters (and the registry) must share the default kind network.
  unset KIND_EXPERIMENTAL_DOCKER_NETWORK
  mkdir -p "$WORK"
  ensure_cluster "$WORKLOAD"
  ensure_cluster "$MANAGEMENT"
  WORKLOAD_API_IP=$(node_ip "$WORKLOAD")
  MGMT_NODE_IP=$(node_ip "$MANAGEMENT")
  # What a NetworkPolicy sees: the kubernetes Service's endpoint, not its ClusterIP.
  local endpoint
  endpoint=$(km get endpoints kubernetes -o jsonpath='{.subsets[0].addresses[0].ip} {.subsets[0].ports[0].port}' 2>/dev/null)
  read -r MGMT_API_IP MGMT_API_PORT <<<"$endpoint"
  if [ -z "$WORKLOAD_API_IP" ] || [ -z "$MGMT_NODE_IP" ] || [ -z "${MGMT_API_PORT:-}" ]; then
    die "could not read the clusters' addresses (workload '$WORKLOAD_API_IP', management '$MGMT_NODE_IP', endpoint '$endpoint')"
  fi
  ok "workload API server https://$WORKLOAD_API_IP:6443, management API endpoint $MGMT_API_IP:$MGMT_API_PORT, gateway https://$MGMT_NODE_IP:$GATEWAY_NODE_PORT"
}

build_companion_image() {
  step "companion image $COMPANION_IMAGE (deploy/Dockerfile), loaded into $MANAGEMENT"
  (cd "$ROOT" && docker build -f deploy/Dockerfile -t "$COMPANION_IMAGE" .)
  kind load docker-image "$COMPANION_IMAGE" --name "$MANAGEMENT"
  COMPANION_IMAGE_ID=$(docker image inspect -f '{{.Id}}' "$COMPANION_IMAGE")
}

install_istio() {
  step "Istio $ISTIO_VERSION in $MANAGEMENT (mesh config from deploy/istio/mesh-config/istio-operator.yaml)"
  render_istio_operator "$WORK/istio-operator.yaml"
  ictl install -y -f "$WORK/istio-operator.yaml"
  km -n istio-system rollout status deploy/istiod --timeout=300s
  km -n istio-system rollout status daemonset/istio-cni-node --timeout=300s
  km -n istio-system rollout status deploy/istio-ingressgateway --timeout=300s
}

# ---- run: the two halves of Tokensmith ------------------------------------------------------
deploy_workload_half() {
  step "workload half: TokenReview rights, app-prod identities, the companion's kubeconfig"
  apply_workload_reviewer
  apply_workload_identities
  mkdir -p "$WORK/workload-creds"
  REVIEWER_TOKEN=$WORK/workload-creds/token WORKLOAD_KUBECONFIG=$WORK/workload-creds/kubeconfig
  # A bounded token (deploy/README.md option A), without a trailing newline; never printed.
  (umask 077 && kw -n tokensmith-system create token tokensmith-reviewer --duration="$REVIEWER_TOKEN_DURATION" | tr -d '\n' >"$REVIEWER_TOKEN")
  WORKLOAD_CA_DATA=$(kw config view --raw --minify --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
  [ -n "$WORKLOAD_CA_DATA" ] || die "no certificate-authority-data in the workload kubeconfig"
  write_workload_kubeconfig "$WORKLOAD_KUBECONFIG"
  ok "kubeconfig for https://$WORKLOAD_API_IP:6443 with a $REVIEWER_TOKEN_DURATION reviewer token"
}

companion_pods() {
  km -n tokensmith-system get pods -l "$COMPANION_SELECTOR" -o json | jq -r '
    [.items[] | select(.metadata.deletionTimestamp == null)] as $p
    | if ($p | length) == 0 then "none\tunready\tno-sidecar" else $p[] | [.metadata.name,
        (if any(.status.conditions[]?; .type == "Ready" and .status == "True") then "ready" else "unready" end),
        (if any(.spec.containers[]; .name == "istio-proxy") and (.spec.containers | length) == 2 then "sidecar"
         elif any(.spec.initContainers[]?; .name == "istio-proxy" and .restartPolicy == "Always") then "native-sidecar"
         else "no-sidecar" end)] | @tsv end'
}

# Ready, and with the sidecar: 2 containers, or (Istio 1.27 on Kubernetes >= 1.33 injects
# native sidecars) istio-proxy as an init container with restartPolicy Always.
check_companion_pods() {
  local pods
  km -n tokensmith-system rollout status deploy/tokensmith --timeout=300s
  pods=$(companion_pods)
  if [[ $pods == *no-sidecar* ]]; then
    note "a companion pod has no sidecar (created before injection?): restarting"
    km -n tokensmith-system rollout restart deploy/tokensmith
    km -n tokensmith-system rollout status deploy/tokensmith --timeout=300s
    pods=$(companion_pods)
  fi
  [[ $pods != *no-sidecar* && $pods != *unready* ]] || die "companion pods not all ready with a sidecar:"$'\n'"$pods"
  ok "companion pods ready with istio-proxy: $(tr '\t\n' ' ;' <<<"$pods")"
}

deploy_management_half() {
  step "management half: app-prod identities and RBAC, the companion (deploy/ + kind overlay)"
  apply_management_identities
  apply_namespace
  apply_workload_kubeconfig
  apply_companion
  check_companion_pods
}

make_gateway_certs() {
  local d=$WORK/certs
  GATEWAY_CA=$d/ca.crt GATEWAY_CRT=$d/tls.crt GATEWAY_KEY=$d/tls.key APISERVER_CA=$d/apiserver-ca.crt
  if [ -s "$GATEWAY_CRT" ] && openssl x509 -checkend 86400 -noout -in "$GATEWAY_CRT" >/dev/null 2>&1; then
    note "reusing the test CA and the gateway certificate"
  else
    mkdir -p "$d"
    cat >"$d/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = tokensmith kind e2e
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$MGMT_HOST, DNS:$OTHER_HOST
EOF
    (
      umask 077
      openssl req -x509 -new -nodes -newkey rsa:2048 -days 30 -config "$d/openssl.cnf" -extensions ca \
        -keyout "$d/ca.key" -out "$GATEWAY_CA"
      openssl req -new -nodes -newkey rsa:2048 -config "$d/openssl.cnf" -subj "/CN=$MGMT_HOST" \
        -keyout "$GATEWAY_KEY" -out "$d/tls.csr"
      openssl x509 -req -in "$d/tls.csr" -CA "$GATEWAY_CA" -CAkey "$d/ca.key" -CAcreateserial \
        -CAserial "$d/ca.srl" -days 30 -extfile "$d/openssl.cnf" -extensions server -out "$GATEWAY_CRT"
    ) 2>"$d/openssl.log" || die "openssl could not make the test certificates: $d/openssl.log"
    ok "test CA and certificate for $MGMT_HOST, $OTHER_HOST"
  fi
  # The CA that signed the management API server's certificate, for TLS origination.
  km -n istio-system get configmap kube-root-ca.crt -o jsonpath='{.data.ca\.crt}' >"$APISERVER_CA"
  [ -s "$APISERVER_CA" ] || die "no kube-root-ca.crt in istio-system"
}

deploy_gateway() {
  step "gateway: TLS for $MGMT_HOST, deploy/istio/, the example route, a second host"
  make_gateway_certs
  apply_gateway_tls
  # A kept run may have left the WasmPlugin: never both paths at once.
  km -n istio-system delete wasmplugin tokensmith --ignore-not-found
  apply_istio_policies
  apply_example_route
  apply_other_host
  km -n echo rollout status deploy/echo --timeout=180s
  CLIENT_KUBECONFIG=$WORK/client-kubeconfig
  write_client_kubeconfig "$CLIENT_KUBECONFIG"
  apply_client_config
}

# ---- run: looking at the gateway -----------------------------------------------------------
gw_pod() { km -n istio-system get pod -l istio=ingressgateway --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}'; }
# Both only on a listener dump that succeeded: an unreachable gateway lacks nothing.
gateway_listeners() { ictl proxy-config listeners "$(gw_pod)" -n istio-system -o json 2>/dev/null; }
gateway_has() {
  local out
  out=$(gateway_listeners) || return 1
  [[ $out == *"$1"* ]]
}
gateway_lacks() {
  local out
  out=$(gateway_listeners) || return 1
  [[ $out != *"$1"* ]]
}
gw_stats() { km -n istio-system exec "$(gw_pod)" -c istio-proxy -- pilot-agent request GET stats; }
# gw_stat NAME: a counter's value, empty when Envoy has no such stat.
gw_stat() {
  local out
  out=$(gw_stats) || return 1
  awk -v n="$1:" '$1 == n { print $2 }' <<<"$out"
}
filter_loaded() { gateway_has 'wasmplugin/istio-system.tokensmith' && [ -n "$(gw_stat wasmcustom.tokensmith.requests)" ]; }

# http_call HOST PATH [HEADER_FILE]: from the host through the mapped port, verifying the
# gateway with the test CA; a SelfSubjectReview POST for SSR_PATH. Prints the status.
# The token travels in a header file, never on a command line.
http_call() {
  local host=$1 path=$2 hfile=${3:-}
  local args=(-sS -o "$HTTP_BODY" -D "$HTTP_HEADERS" -w '%{http_code}' --max-time 20
    --resolve "$host:$GATEWAY_HOST_PORT:127.0.0.1" --cacert "$GATEWAY_CA")
  if [ "$path" = "$SSR_PATH" ]; then args+=(-X POST -H 'Content-Type: application/json' --data "$SSR_BODY"); fi
  if [ -n "$hfile" ]; then args+=(-H "@$hfile"); fi
  : >"$HTTP_BODY"
  curl "${args[@]}" "https://$host:$GATEWAY_HOST_PORT$path" 2>"$WORK/http/error" || true
}
body_excerpt() {
  if [ -s "$HTTP_BODY" ]; then printf ' — body: %s' "$(head -c 300 "$HTTP_BODY" | tr -d '\n' | redact)"; fi
  if [ -s "$WORK/http/error" ]; then printf ' — curl: %s' "$(redact <"$WORK/http/error")"; fi
}
status_is() {
  local want=$1
  shift
  [ "$(http_call "$@")" = "$want" ]
}
# expect WANT WHAT HOST PATH [HEADER_FILE]
expect() {
  local want=$1 what=$2 got
  shift 2
  got=$(http_call "$@")
  [ "$got" = "$want" ] || die "$what: expected HTTP $want, got $got$(body_excerpt)"
  ok "$what: HTTP $got"
}
# The companion (and the filter) answer 401 with a Bearer challenge; an API server without
# an exchange in front would not.
expect_bearer_challenge() {
  grep -qi '^www-authenticate: *Bearer' "$HTTP_HEADERS" || die "$1: 401 without 'www-authenticate: Bearer'"
}
# expect_exchanged WHAT HEADER_FILE: the management API server saw app-prod/eso-sa, i.e. a
# token it issued itself (the workload token would have been a 401).
expect_exchanged() {
  local got user
  got=$(http_call "$MGMT_HOST" "$SSR_PATH" "$2")
  [[ $got == 200 || $got == 201 ]] || die "$1: expected the API server's answer, got HTTP $got$(body_excerpt)"
  user=$(jq -r '.status.userInfo.username // empty' "$HTTP_BODY" 2>/dev/null || true)
  [ "$user" = "$ESO_USER" ] || die "$1: the API server saw '${user:-nobody}', not $ESO_USER"
  ok "$1: HTTP $got, the API server saw $user"
}
# For wait_until: a subshell, so the die inside ends this attempt only.
exchanged_ok() { (expect_exchanged "$@") >/dev/null 2>&1; }

# mint CLUSTER SA NAME: a fresh 10-minute token of app-prod/SA as a header file (mode 600),
# its path in MINTED (no $(...): the token must be written before anyone uses it).
mint() {
  local file=$WORK/tokens/$3
  mkdir -p "$WORK/tokens"
  (
    umask 077
    kube "$1" -n app-prod create token "$2" --duration=10m | tr -d '\n' >"$file.token"
    printf 'Authorization: Bearer %s\n' "$(cat "$file.token")" >"$file.header"
  )
  MINTED=$file.header
}

# ---- run: the assertions of one path -------------------------------------------------------
run_client_job() {
  local name=$1 apply=$2 deadline uid pod marker user
  kw -n app-prod delete job "$name" --ignore-not-found --cascade=foreground --wait=true >/dev/null
  "$apply"
  deadline=$((SECONDS + 300))
  until [ "$(kw -n app-prod get job "$name" -o jsonpath='{.status.succeeded}')" = 1 ]; do
    [ "$(kw -n app-prod get job "$name" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')" != True ] ||
      die "Job $name failed: it could not read app-prod/eso-secret through the gateway"
    [ "$SECONDS" -lt "$deadline" ] || die "Job $name did not finish within 300s"
    sleep 3
  done
  uid=$(kw -n app-prod get job "$name" -o jsonpath='{.metadata.uid}')
  pod=$(kw -n app-prod get pods -o json | jq -r --arg uid "$uid" \
    '.items[] | select(any(.metadata.ownerReferences[]?; .uid == $uid)) | select(.status.phase == "Succeeded") | .metadata.name' | head -n 1)
  marker=$(kw -n app-prod logs "$pod" -c read-secret)
  [ "$marker" = "$(printf '%s' "$ESO_MARKER" | base64)" ] || die "Job $name read something else than app-prod/eso-secret"
  user=$(kw -n app-prod logs "$pod" -c whoami | jq -r '.status.userInfo.username // empty' 2>/dev/null || true)
  [ "$user" = "$ESO_USER" ] || die "Job $name: kubectl auth whoami says '${user:-nothing}', not $ESO_USER"
  ok "Job $name in $WORKLOAD (its own token): read app-prod/eso-secret; auth whoami = $user"
}

direct_check_refused() {
  local phase last
  km -n default delete pod tokensmith-direct-caller --ignore-not-found --wait=true >/dev/null
  apply_direct_caller
  wait_until 180 "the direct caller to finish" pod_finished
  phase=$(km -n default get pod tokensmith-direct-caller -o jsonpath='{.status.phase}')
  last=$(km -n default logs tokensmith-direct-caller 2>&1 | tail -n 1 | redact || true)
  [ "$phase" = Failed ] || die "a Check from namespace default was answered (pod $phase): $last"
  ok "direct Check from namespace default refused: $last"
}
pod_finished() {
  local p
  p=$(km -n default get pod tokensmith-direct-caller -o jsonpath='{.status.phase}')
  [[ $p == Succeeded || $p == Failed ]]
}
no_companion_pods() { [ -z "$(km -n tokensmith-system get pods -l "$COMPANION_SELECTOR" -o name)" ]; }

companion_down() {
  local fresh again
  km -n tokensmith-system scale deploy/tokensmith --replicas=0 >/dev/null
  wait_until 120 "the companion pods to be gone" no_companion_pods
  # Fresh tokens: nothing cached may answer for them.
  mint "$WORKLOAD" eso-sa "$1-down"
  fresh=$MINTED
  wait_until 60 "HTTP 503 with the companion scaled to 0" status_is 503 "$MGMT_HOST" "$SSR_PATH" "$fresh"
  ok "companion scaled to 0: HTTP 503"
  km -n tokensmith-system scale deploy/tokensmith --replicas=2 >/dev/null
  check_companion_pods
  mint "$WORKLOAD" eso-sa "$1-again"
  again=$MINTED
  wait_until 90 "the exchange to work again" exchanged_ok "back" "$again"
  expect_exchanged "companion back" "$again"
}

gateway_cases() {
  local path=$1 eso only mgmt h0 h1 o0 o1
  wait_until 120 "the gateway to answer for $MGMT_HOST" status_is 401 "$MGMT_HOST" "$SSR_PATH"
  expect 401 "no token" "$MGMT_HOST" "$SSR_PATH"
  expect_bearer_challenge "no token"
  if [ "$path" = custom ]; then
    run_client_job tokensmith-e2e-client-custom apply_client_job_custom
  else
    run_client_job tokensmith-e2e-client-wasm apply_client_job_wasm
  fi
  mint "$WORKLOAD" eso-sa "$path-eso"
  eso=$MINTED
  mint "$WORKLOAD" workload-only "$path-workload-only"
  only=$MINTED
  mint "$MANAGEMENT" eso-sa "$path-management"
  mgmt=$MINTED
  expect_exchanged "workload token of app-prod/eso-sa" "$eso"
  if [ "$path" = wasm ]; then
    h0=$(gw_stat wasmcustom.tokensmith.cache_hits)
    expect_exchanged "the same token again" "$eso"
    h1=$(gw_stat wasmcustom.tokensmith.cache_hits)
    [ "${h1:-0}" -gt "${h0:-0}" ] || die "no cache hit: wasmcustom.tokensmith.cache_hits stayed ${h0:-0}"
    ok "filter cache hit: wasmcustom.tokensmith.cache_hits ${h0:-0} -> $h1"
  fi
  expect 403 "app-prod/workload-only (no such account in $MANAGEMENT)" "$MGMT_HOST" "$SSR_PATH" "$only"
  expect 401 "a $MANAGEMENT token (the workload cluster rejects it)" "$MGMT_HOST" "$SSR_PATH" "$mgmt"
  expect_bearer_challenge "a $MANAGEMENT token"
  if [ "$path" = wasm ]; then o0=$(gw_stat wasmcustom.tokensmith.other_host); fi
  expect 200 "$OTHER_HOST without any token" "$OTHER_HOST" '/echo?msg=tokensmith-e2e'
  if [ "$path" = wasm ]; then
    o1=$(gw_stat wasmcustom.tokensmith.other_host)
    [ "${o1:-0}" -gt "${o0:-0}" ] || die "the filter did not count $OTHER_HOST as another host"
    ok "the filter passed $OTHER_HOST untouched (other_host ${o0:-0} -> $o1)"
  fi
  direct_check_refused
  companion_down "$path"
}

phase_custom() {
  step "CUSTOM provider: the gateway's ext_authz asks the companion (deploy/istio/gateway-policy.yaml)"
  wait_until 120 "the WasmPlugin filter to leave the gateway" gateway_lacks 'wasmplugin/istio-system.tokensmith'
  wait_until 120 "ext_authz on the gateway" gateway_has 'envoy.filters.http.ext_authz'
  gateway_cases custom
}

# The registry container on the kind network. Pods find it by its container name: kind's
# node entrypoint (enable_network_magic) routes pod DNS, through CoreDNS, to Docker's
# embedded DNS, and istio-agent in the gateway pod pulls the module itself.
ensure_registry() {
  local running nets mapped
  running=$(docker inspect -f '{{.State.Running}}' "$REGISTRY_NAME" 2>/dev/null || true)
  if [ -z "$running" ]; then
    docker run -d --restart=always --name "$REGISTRY_NAME" --network "$KIND_NETWORK" \
      --label io.tokensmith.kind-e2e=true -p "127.0.0.1:$REGISTRY_HOST_PORT:5000" "$REGISTRY_IMAGE" >/dev/null
  elif [ "$running" != true ]; then
    docker start "$REGISTRY_NAME" >/dev/null
  fi
  nets=$(docker inspect -f '{{json .NetworkSettings.Networks}}' "$REGISTRY_NAME")
  if [ "$(jq --arg n "$KIND_NETWORK" 'has($n)' <<<"$nets")" != true ]; then
    docker network connect "$KIND_NETWORK" "$REGISTRY_NAME"
  fi
  mapped=$(docker port "$REGISTRY_NAME" 5000/tcp 2>/dev/null || true)
  [[ $mapped == *":$REGISTRY_HOST_PORT"* ]] ||
    die "container $REGISTRY_NAME publishes 5000 as '${mapped:-nothing}', not $REGISTRY_HOST_PORT (REGISTRY_HOST_PORT)"
  wait_until 60 "the registry on localhost:$REGISTRY_HOST_PORT" curl -fsS -o /dev/null "http://127.0.0.1:$REGISTRY_HOST_PORT/v2/"
}

push_filter() {
  local ref=localhost:$REGISTRY_HOST_PORT/$FILTER_REPO:$FILTER_TAG served flags=()
  (cd "$ROOT" && make wasmplugin)
  WASM_DIGEST=$(jq -r '.manifests[0].digest' "$ROOT/target/wasmplugin-oci/index.json")
  if [ "$PUSHER" = skopeo ]; then
    # Older skopeo lacks --preserve-digests; the digest is compared below either way.
    if [[ $(skopeo copy --help 2>&1) == *--preserve-digests* ]]; then flags=(--preserve-digests); fi
    skopeo copy ${flags[@]+"${flags[@]}"} --dest-tls-verify=false "oci:$ROOT/target/wasmplugin-oci:$FILTER_TAG" "docker://$ref"
    served=sha256:$(skopeo inspect --raw --tls-verify=false "docker://$ref" | sha256sum | cut -d' ' -f1)
  else
    crane push --insecure "$ROOT/target/wasmplugin-oci" "$ref"
    served=$(crane digest --insecure "$ref")
  fi
  [ "$served" = "$WASM_DIGEST" ] || die "the registry serves $served, make wasmplugin built $WASM_DIGEST"
  ok "pushed $ref = $WASM_DIGEST (the digest make wasmplugin printed)"
}

phase_wasm() {
  step "WasmPlugin: the filter on the gateway asks the companion (wasmplugin/wasmplugin.yaml)"
  ensure_registry
  push_filter
  # Both paths would exchange the token: remove the CUSTOM policy first (README).
  km -n istio-system delete authorizationpolicy tokensmith-exchange --ignore-not-found
  wait_until 120 "ext_authz to leave the gateway" gateway_lacks 'envoy.filters.http.ext_authz'
  apply_wasmplugin
  wait_until 240 "the filter to load on the gateway (wasmcustom.tokensmith.* stats)" filter_loaded
  ok "filter loaded: $(gw_stats | grep -c '^wasmcustom\.tokensmith\.') wasmcustom.tokensmith.* counters"
  gateway_cases wasm
}

# ---- failure, success, teardown -------------------------------------------------------------
diag() {
  local title=$1
  shift
  printf -- '--- %s\n' "$title"
  "$@" 2>&1 | redact | tail -n 120
}
diag_gateway_clusters() { ictl proxy-config clusters "$1" -n istio-system | grep -E 'tokensmith|kubernetes\.default'; }
diag_gateway_stats() { gw_stats | grep -E 'tokensmith|ext_authz|wasm'; }

diagnostics() {
  local gw
  printf '\n==> diagnostics (tokens redacted)\n'
  if cluster_exists "$MANAGEMENT"; then
    gw=$(gw_pod 2>/dev/null)
    diag "management pods" km get pods -A -o wide
    diag "Istio objects" km get gateways.networking.istio.io,virtualservices,destinationrules,authorizationpolicies,peerauthentications,wasmplugins -A
    if [ -n "$gw" ]; then
      diag "gateway listeners" ictl proxy-config listeners "$gw" -n istio-system
      diag "gateway clusters" diag_gateway_clusters "$gw"
      diag "gateway stats" diag_gateway_stats
      diag "gateway log" km -n istio-system logs "$gw" -c istio-proxy --tail=80
      diag "gateway: DNS of $REGISTRY_NAME" km -n istio-system exec "$gw" -c istio-proxy -- getent hosts "$REGISTRY_NAME"
    fi
    diag "companion log" km -n tokensmith-system logs -l "$COMPANION_SELECTOR" -c tokensmith --prefix --tail=60
    diag "companion sidecar log" km -n tokensmith-system logs -l "$COMPANION_SELECTOR" -c istio-proxy --prefix --tail=30
    diag "companion pods" km -n tokensmith-system describe pods -l "$COMPANION_SELECTOR"
    diag "gateway pod" km -n istio-system describe pods -l istio=ingressgateway
    diag "direct caller log" km -n default logs tokensmith-direct-caller
  fi
  if cluster_exists "$WORKLOAD"; then
    diag "workload pods" kw get pods -A -o wide
    diag "client Job pods" kw -n app-prod describe pods -l app.kubernetes.io/name=tokensmith-e2e-client
    diag "client Job logs" kw -n app-prod logs -l app.kubernetes.io/name=tokensmith-e2e-client --all-containers --prefix --tail=40
  fi
}

on_err() { [ -n "$FAILED_AT" ] || FAILED_AT="line $1: $2"; }
on_exit() {
  local rc=$?
  set +e
  trap - ERR
  if [ "$rc" -ne 0 ] && [ "$MODE" = run ]; then
    printf '\nFAILED (exit %s) at %s\n' "$rc" "${FAILED_AT:-?}" >&2
    if cluster_exists "$MANAGEMENT" || cluster_exists "$WORKLOAD"; then
      diagnostics >&2
      printf '\nThe clusters are kept for a look (kubectl --kubeconfig %s --context kind-%s ...);\n%s --teardown deletes them.\n' \
        "$KUBECONFIG_FILE" "$MANAGEMENT" "$SELF" >&2
    fi
  fi
  if [ "${#CLEANUP[@]}" -gt 0 ]; then rm -rf "${CLEANUP[@]}"; fi
  exit "$rc"
}

teardown() {
  local c
  step "teardown"
  command -v kind >/dev/null 2>&1 || die "kind is missing: https://github.com/kubernetes-sigs/kind/releases/tag/$KIND_VERSION"
  for c in "$WORKLOAD" "$MANAGEMENT"; do
    if cluster_exists "$c"; then kind delete cluster --name "$c"; fi
  done
  # Only a registry this script started: kind's own docs name theirs kind-registry too.
  if [ "$(docker inspect -f '{{index .Config.Labels "io.tokensmith.kind-e2e"}}' "$REGISTRY_NAME" 2>/dev/null)" = true ]; then
    docker rm -f "$REGISTRY_NAME" >/dev/null
  fi
  rm -rf "$WORK" "$ROOT/target/kind-overlay"
  ok "clusters, registry and $WORK removed"
}

run() {
  # kustomize refuses paths outside its root, so the overlays live in the repository.
  OVERLAY_DIR=$ROOT/target/kind-overlay
  select_versions
  preflight_run
  mkdir -p "$WORK/http"
  create_clusters
  build_companion_image
  install_istio
  deploy_workload_half
  deploy_management_half
  deploy_gateway
  phase_custom
  phase_wasm
  step "PASS: both paths exchanged app-prod/eso-sa across the clusters and refused the rest"
  if [ "$KEEP" = 1 ]; then
    note "kept: kubectl --kubeconfig $KUBECONFIG_FILE --context kind-$MANAGEMENT|kind-$WORKLOAD ..."
    note "      curl --resolve $MGMT_HOST:$GATEWAY_HOST_PORT:127.0.0.1 --cacert $GATEWAY_CA https://$MGMT_HOST:$GATEWAY_HOST_PORT/..."
  else
    teardown
  fi
}

main() {
  while [ $# -gt 0 ]; do
    case $1 in
    --keep) KEEP=1 ;;
    --teardown) MODE=teardown ;;
    --render)
      [ $# -ge 2 ] || die "--render needs a directory"
      MODE=render RENDER_DIR=$2
      shift
      ;;
    --check) MODE=check ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      exit 64
      ;;
    esac
    shift
  done
  trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR
  trap on_exit EXIT
  case $MODE in
  run) run ;;
  teardown) teardown ;;
  render) render "$RENDER_DIR" ;;
  check) check ;;
  esac
}

main "$@"
