#!/usr/bin/env bash
# The kernels' NEON paths: cross-compile the kernel tests for aarch64 into build-aarch64/ and run
# them under qemu-user: actsparse-test-kernels against the CPU backend built for NEON + dotprod,
# then actsparse-test-kernels-asan. Each prints "N passed, M failed"; the exit status is 0 only
# when both pass (3 when the cross tools are missing).
#   ACTSPARSE_NEON_ARCH  -march for the CPU backend (default armv8.2-a+dotprod+fp16, a Raspberry Pi 5;
#                        armv8-a is a Raspberry Pi 4)
#   ACTSPARSE_NEON_BUILD build directory (default build-aarch64), JOBS (default 2)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${ACTSPARSE_NEON_BUILD:-$root/build-aarch64}
arch=${ACTSPARSE_NEON_ARCH:-armv8.2-a+dotprod+fp16}
jobs=${JOBS:-2}
sysroot=/usr/aarch64-linux-gnu

missing=()
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ qemu-aarch64 cmake; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] || missing+=("$sysroot (libc6-arm64-cross)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "error: test-neon needs ${missing[*]}; install: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user" >&2
    exit 3
fi

# same ccache settings as the Makefile: paths relative to the checkout, so clones share hits
export CCACHE_BASEDIR=$root CCACHE_NOHASHDIR=1

# configure output only when it fails: a re-run repeats llama.cpp's warnings about missing git metadata
configure() {
    mkdir -p "$build"
    local log=$build/test-neon-configure.log
    cmake "$@" >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "error: configuring $build failed (log: $log)" >&2; exit 1; }
}
if [ ! -f "$build/CMakeCache.txt" ]; then
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    configure -S "$root" -B "$build" "${generator[@]}" \
        -DCMAKE_TOOLCHAIN_FILE="$root/cmake/toolchain-aarch64-linux-gnu.cmake" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch"
elif ! grep -q "^CMAKE_TOOLCHAIN_FILE:.*/toolchain-aarch64-linux-gnu.cmake$" "$build/CMakeCache.txt"; then
    echo "error: $build was not configured with cmake/toolchain-aarch64-linux-gnu.cmake; remove it or choose another ACTSPARSE_NEON_BUILD" >&2
    exit 2
elif ! grep -qx "GGML_CPU_ARM_ARCH:STRING=$arch" "$build/CMakeCache.txt"; then
    configure "$build" -DGGML_CPU_ARM_ARCH="$arch"
fi
cmake --build "$build" -j"$jobs" --target actsparse-test-kernels actsparse-test-kernels-asan

# qemu's "max" CPU has dotprod and fp16; -L finds the dynamic loader and libc of the cross sysroot
export QEMU_CPU=${QEMU_CPU:-max}
rc=0
echo "== actsparse-test-kernels (CPU backend -march=$arch, qemu CPU $QEMU_CPU)"
qemu-aarch64 -L "$sysroot" "$build/bin/actsparse-test-kernels" || rc=1
# The sanitized build compiles the kernels itself, for base armv8-a. LeakSanitizer cannot run
# under qemu-user (it stops the threads with ptrace); ASan's other checks and UBSan do.
echo "== actsparse-test-kernels-asan (ASan + UBSan, kernels for base armv8-a)"
ASAN_OPTIONS=detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS} qemu-aarch64 -L "$sysroot" "$build/bin/actsparse-test-kernels-asan" || rc=1
exit $rc
