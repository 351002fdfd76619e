#!/usr/bin/env bash
# `make mutants`: plants known defects, one at a time, in a scratch copy of HEAD and runs
# the test suite against each. Every defect must make the suite fail; one that passes is
# a hole in the tests. Prints one line per defect and a score, and exits 1 when a defect
# survives. The scratch copy and its target dir live under target/mutants and are never
# the checkout.
#
# Usage: scripts/mutants.sh [--quick] [NAME...]
#   --quick  run, for each defect, only the tests named beside it (minutes, not hours);
#            the score in docs/reliability.md says which mode it came from.
#   NAME     only these defects (default: all of them).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=false
wanted=()
for arg in "$@"; do
  case $arg in
    --quick) quick=true ;;
    -*) echo "unknown flag $arg" >&2; exit 2 ;;
    *) wanted+=("$arg") ;;
  esac
done

work=$root/target/mutants
scratch=$work/src
export CARGO_TARGET_DIR=$work/target
mkdir -p "$work"
rm -rf "$scratch"
mkdir -p "$scratch"
git archive HEAD | tar -x -C "$scratch"
# What the suite reads beside or inside the checkout: ../shared, Envoy in .venv.
ln -sfn "$(realpath ../shared)" "$work/shared"
[ -d .venv ] && ln -sfn "$root/.venv" "$scratch/.venv"

names=()
files=()
edits=()
tests=()
# defect NAME FILE TESTS OLD NEW [OLD NEW]...: replace each exact text OLD (found once)
# with its NEW in FILE. TESTS is the e2e/unit filter used by --quick.
defect() {
  local name=$1 file=$2 filter=$3 pairs=()
  shift 3
  while [ $# -ge 2 ]; do
    pairs+=("$1" "$2")
    shift 2
  done
  names+=("$name"); files+=("$file"); tests+=("$filter")
  # Pairs joined by NUL-free separators for the python below.
  local joined
  joined=$(printf '%s\x1e' "${pairs[@]}")
  edits+=("$joined")
}

defect log-token-tail service/src/authz.rs "companion::" \
'        let token = match bearer::parse(authorization) {
            Ok(token) => token,' \
'        let token = match bearer::parse(authorization) {
            Ok(token) => {
                let t = token.expose();
                tracing::info!(tail = &t[t.len().saturating_sub(30)..], "bearer");
                token
            }'

# From the middle of the claims: the head (`eyJ…`) and any 64-character run are rewritten
# by the log redactor, so logging those is no leak; this piece would be.
defect log-token-middle service/src/authz.rs "companion::" \
'        let token = match bearer::parse(authorization) {
            Ok(token) => token,' \
'        let token = match bearer::parse(authorization) {
            Ok(token) => {
                let t = token.expose();
                let from = t.find(".").map_or(0, |dot| dot + 20);
                tracing::info!(piece = t.get(from..from + 30).unwrap_or(""), "bearer");
                token
            }'

# The digest is checked where a slot is found and again where it serves: both go.
defect filter-cache-ignores-digest filter/src/cache.rs "filter::" \
'            let entry = Entry::decode(&bytes).filter(|e| e.digest == *digest)?;' \
'            let entry = Entry::decode(&bytes)?;' \
'        self.digest == *digest && self.alive(now)' \
'        let _ = digest;
        self.alive(now)'

defect exchange-hit-ignores-lifetime service/src/exchange/cache.rs "companion::lifetime" \
'            if now < cached.serve_until && cached.token.expires_at <= latest_allowed {' \
'            if now < cached.serve_until {'

defect coalesced-exchange-ignores-lifetime service/src/exchange/cache.rs "companion::concurrent_long_and_short" \
'        if cached.token.expires_at > latest_allowed {' \
'        if false {'

defect drain-cuts-checks-off service/src/server.rs "companion::sigterm" \
'        match tokio::time::timeout(grace, &mut self.server).await {' \
'        match tokio::time::timeout(Duration::ZERO, &mut self.server).await {'

defect validation-ttl-ignored service/src/review.rs "production::token_reviews_are_cached" \
'                self.ttl.min(left)' \
'                (self.ttl * 10).min(left)'

defect request-id-fixed service/src/authz.rs "companion::exchange_keeps" \
'    } else {
        http.id.clone()
    }' \
'    } else {
        "req-1".to_owned()
    }'

defect in-flight-metric-renamed service/src/metrics.rs "production::metrics_count" \
'            "checks_in_flight",' \
'            "checks_inflight",'

defect management-401-blames-the-caller service/src/deny.rs "companion::api_server_failures" \
'            404 => not_found.unwrap_or(DenyReason::Unavailable(cluster)),' \
'            404 => not_found.unwrap_or(DenyReason::Unavailable(cluster)),
            401 if cluster == Side::Management => DenyReason::InvalidToken,'

defect fail-open-lets-429-through filter/src/flow.rs "envoy::companion_503_and_429" \
'        Verdict::Deny {
            status,
            headers,
            body,
        } => Decision {' \
'        Verdict::Deny { status: 429, .. } => on_dispatch_failure(config),
        Verdict::Deny {
            status,
            headers,
            body,
        } => Decision {'

# A defect that does not build proves nothing about the tests: that is an error here.
build() {
  (
    cd "$scratch"
    cargo build --quiet --locked --workspace --bins --tests &&
      cargo build --quiet --locked -p tokensmith-filter --target wasm32-wasip1 --profile wasm
  ) >"$work/last.log" 2>&1
}

run_suite() {
  (
    cd "$scratch"
    if $quick; then
      cargo test --quiet --locked --workspace -- "$@"
    else
      cargo test --quiet --locked --workspace
    fi
  ) >"$work/last.log" 2>&1
}

# The suite must pass without a defect, or "caught" means nothing.
echo "mutants: the suite without a defect ..."
build || { echo "mutants: HEAD does not build (${work#"$root"/}/last.log)" >&2; exit 2; }
run_suite "${tests[@]}" || {
  echo "mutants: the suite fails without a defect (${work#"$root"/}/last.log)" >&2
  exit 2
}

results=()
survived=()
for i in "${!names[@]}"; do
  name=${names[$i]}
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then
    continue
  fi
  file=${files[$i]}
  git show "HEAD:$file" >"$scratch/$file"
  if ! PAIRS=${edits[$i]} python3 - "$scratch/$file" <<'EOF'
import os, sys
path = sys.argv[1]
text = open(path).read()
parts = os.environ["PAIRS"].split("\x1e")[:-1]
for old, new in zip(parts[0::2], parts[1::2]):
    if text.count(old) != 1:
        sys.exit(1)
    text = text.replace(old, new)
open(path, "w").write(text)
EOF
  then
    echo "mutants: $name no longer applies to $file: update scripts/mutants.sh" >&2
    exit 2
  fi
  echo "mutants: $name ($file) ..."
  start=$SECONDS
  if ! build; then
    cp "$work/last.log" "$work/$name.log"
    echo "mutants: $name does not build (${work#"$root"/}/$name.log): fix the defect" >&2
    exit 2
  fi
  if run_suite "${tests[$i]}"; then
    outcome="SURVIVED (the suite passed)"
    survived+=("$name")
    cp "$work/last.log" "$work/$name.log"
  else
    outcome="caught"
  fi
  results+=("$(printf '%-38s %-28s %5d s  %s' "$name" "$file" $((SECONDS - start)) "$outcome")")
  git show "HEAD:$file" >"$scratch/$file"
done

echo
mode=full; $quick && mode=quick
echo "defect                                 file                          time  outcome ($mode)"
printf '%s\n' "${results[@]}"
echo "score: $((${#results[@]} - ${#survived[@]})) of ${#results[@]} caught"
if [ ${#survived[@]} -gt 0 ]; then
  echo "mutants: survived: ${survived[*]} (logs in ${work#"$root"/})" >&2
  exit 1
fi
