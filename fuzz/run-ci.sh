#!/usr/bin/env bash
# CI fuzzing: installs cargo-fuzz if missing, checks the harnesses and the committed
# corpus on the ordinary test runner, then runs every target for a bounded time
# (FUZZ_SECONDS each, default 30) and fails if any of them finds a crash.
#
#   fuzz/run-ci.sh                      # all seven targets, 30 s each
#   FUZZ_SECONDS=300 fuzz/run-ci.sh     # longer
#   FUZZ_TARGETS="server" fuzz/run-ci.sh
#   FUZZ_SANITIZER=address fuzz/run-ci.sh   # with ASan (slower)
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir="$PWD"
seconds="${FUZZ_SECONDS:-30}"
targets="${FUZZ_TARGETS:-decode server client roundtrip secure store gguf}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz/run-ci.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# The harnesses on stable-style tests: seeds current and read back as built,
# every committed corpus file runs clean.
cargo +nightly test --release --quiet

# Without AddressSanitizer: the code under test is safe Rust, and on this
# two-core machine ASan cuts executions per second by five to ten times.
sanitizer="${FUZZ_SANITIZER:-none}"
cargo +nightly fuzz build -s "$sanitizer"
failed=()
for target in $targets; do
    # New inputs go to a scratch corpus under target/ (gitignored); the
    # committed corpus is read only.
    work="$fuzz_dir/target/ci-corpus/$target"
    mkdir -p "$work"
    # gguf: its own dictionary (GGUF keys and tensor names), and memory
    # bounds: a hostile model file must never make the loader allocate
    # without bound (any single allocation above 1 GiB is a failure).
    dict="$fuzz_dir/dict"
    limits=()
    if [[ "$target" == gguf ]]; then
        dict="$fuzz_dir/gguf.dict"
        limits=(-rss_limit_mb=2048 -malloc_limit_mb=1024)
    fi
    echo "=== fuzz $target for ${seconds}s"
    if ! cargo +nightly fuzz run -s "$sanitizer" "$target" "$work" "$fuzz_dir/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -dict="$dict" "${limits[@]}" -print_final_stats=1; then
        failed+=("$target")
    fi
done
total=$(wc -w <<<"$targets")
if ((${#failed[@]})); then
    echo "fuzz/run-ci.sh: crashes in: ${failed[*]} (see fuzz/artifacts/ and fuzz/README.md)" >&2
    echo "fuzz: $((total - ${#failed[@]})) passed, ${#failed[@]} failed"
    exit 1
fi
echo "fuzz targets with no crash in ${seconds}s each: $targets"
echo "fuzz: $total passed, 0 failed"
