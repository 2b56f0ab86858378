#!/usr/bin/env bash
# Editing llama.cpp: `init` lays out the pinned source as a git work tree with patches/ applied,
# one commit per patch; `export` writes one patch per commit after the pristine one back to patches/.
# Build against the work tree with:  cmake -S . -B build-dev -DLLAMA_CPP_SOURCE_DIR=$PWD/work/llama.cpp \
#                                          -DACTSPARSE_SOURCE_IS_PATCHED=ON
set -euo pipefail
cmd=${1:?init|export}; build=${2:?build dir}; tree=${3:?work tree}
root=$(cd "$(dirname "$0")/.." && pwd)
git_() { git -C "$tree" -c user.name=actsparse -c user.email=actsparse@localhost "$@"; }

case "$cmd" in
init)
    if [ -d "$tree/.git" ]; then echo "error: $tree exists; remove it or run 'make patches'" >&2; exit 2; fi
    sdist=$(ls "${ACTSPARSE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/actsparse}"/sdist/llama_cpp_python-*.tar.gz | head -1)
    mkdir -p "$tree"
    tar -xzf "$sdist" -C "$tree" --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
    rm -f "$tree/.git"
    git_ init -q
    git_ add -A && git_ commit -qm pristine && git_ tag pristine
    for p in "$root"/patches/*.patch; do
        [ -e "$p" ] || continue
        git_ am -q --3way "$p" || { echo "error: patch $(basename "$p") does not apply" >&2; exit 1; }
    done
    echo "llama.cpp work tree ready in $tree (tag 'pristine' = the pinned commit)"
    ;;
export)
    [ -d "$tree/.git" ] || { echo "error: no work tree at $tree (run 'make llama-src')" >&2; exit 2; }
    if ! git_ diff --quiet HEAD; then echo "error: uncommitted changes in $tree; commit them first" >&2; exit 2; fi
    rm -f "$root"/patches/*.patch
    git_ format-patch -q --no-signature --zero-commit --no-stat -N -o "$root/patches" pristine..HEAD
    ls "$root"/patches
    ;;
*) echo "usage: $0 init|export BUILD TREE" >&2; exit 2 ;;
esac
