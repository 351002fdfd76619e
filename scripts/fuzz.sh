#!/usr/bin/env bash
# `make fuzz`: runs every target in fuzz/fuzz_targets for FUZZ_SECONDS each, one after the
# other, on the nightly toolchain (libFuzzer needs it). New inputs and crash artifacts go to
# target/fuzz, never into the committed corpus: libFuzzer writes to the first corpus
# directory it is given, so a scratch directory comes first and fuzz/corpus/<target> second.
# Ends with one line per target (seconds, executions, outcome) and fails if any crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
tools=${TOOLS:-$PWD/.tools}
work=$PWD/target/fuzz
targets=${FUZZ_TARGETS:-$(find fuzz/fuzz_targets -name '*.rs' -printf '%f\n' | sed 's/\.rs$//' | sort)}

if ! rustup toolchain list | grep -q nightly; then
  echo "make fuzz: fuzzing needs a nightly Rust toolchain (libFuzzer instrumentation), and none is installed." >&2
  echo "           Install one with: rustup toolchain install nightly" >&2
  echo "           Without it, the committed corpora in fuzz/corpus still replay on stable in make test." >&2
  exit 1
fi
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz into .tools"
  cargo +nightly install --quiet cargo-fuzz --root "$tools" --locked
fi
export PATH="$tools/bin:$PATH" CARGO_TARGET_DIR="$work"

# One build for every target, so the time boxes below are fuzzing time only.
cargo +nightly fuzz build --fuzz-dir fuzz

mkdir -p "$work/logs"
summary=()
failed=()
for target in $targets; do
  [ -d "fuzz/corpus/$target" ] || { echo "fuzz/corpus/$target is missing" >&2; exit 1; }
  scratch=$work/new-inputs/$target
  artifacts=$work/artifacts/$target
  mkdir -p "$scratch" "$artifacts"
  log=$work/logs/$target.log
  echo "fuzz: $target for ${seconds} s (log: ${log#"$PWD"/})"
  if cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$scratch" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -artifact_prefix="$artifacts/" -print_final_stats=1 \
      >"$log" 2>&1; then
    outcome="no crash"
  else
    outcome="CRASH: see ${artifacts#"$PWD"/} and ${log#"$PWD"/}"
    failed+=("$target")
  fi
  # libFuzzer's last words: "Done 123456 runs in 61 second(s)".
  runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 \2/p' "$log" | tail -1)
  runs=${runs:-"- -"}
  summary+=("$(printf '%-16s %6s s %12s runs  %s' "$target" "${runs#* }" "${runs% *}" "$outcome")")
done

echo
echo "target              seconds     executions  outcome"
printf '%s\n' "${summary[@]}"
echo "new inputs (not committed): ${work#"$PWD"/}/new-inputs; fold useful ones in with cargo fuzz cmin"
if [ ${#failed[@]} -gt 0 ]; then
  echo "make fuzz: crashes in: ${failed[*]}" >&2
  exit 1
fi
