#!/usr/bin/env bash
# Builds the llama.cpp tools qatctl's GGUF checks and benchmarks use (llama-bench, llama-cli,
# llama-quantize, llama-server) from the llama.cpp source that the llama-cpp-python package vendors
# (the recipe of ../shared/tools/build-llama-bench.sh, more targets). 10-25 minutes on 2 cores.
#   bash bench/build-llama.sh [DIR]     -> prints the bin/ folder last; DIR/VERSION says which llama.cpp
set -euo pipefail
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-cpp}
BIN=$DIR/src/build/bin
TOOLS=(llama-bench llama-cli llama-quantize llama-server)
# GGML_NATIVE builds for this CPU's instruction set: a build made on another machine (sessions
# differ: AVX2-only one day, AVX512/AMX the next) can die of SIGILL here, so the flags it was built
# for are stamped beside it and a different CPU rebuilds.
CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|amx|f16c|fma|sse|bmi)' | sort | tr '\n' ' ')
done_all=1; for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || done_all=0; done
[ "$(cat "$DIR/BUILT_FOR" 2>/dev/null)" = "$CPU_FLAGS" ] || done_all=0
# The llama.cpp commit the sdist vendors: the HEAD of its vendor/llama.cpp submodule, kept in the
# sdist's .git (its CHANGELOG says the same: "update llama.cpp to ggml-org/llama.cpp@<commit>").
vendored_commit() { tar xzf "$1" -O --wildcards '*/.git/modules/vendor/llama.cpp/HEAD' 2>/dev/null | head -c 40; }
if [ "$done_all" = 1 ]; then
  if ! grep -q '^llama.cpp commit:' "$DIR/VERSION" 2>/dev/null; then  # a build made before the line existed
    c=$(vendored_commit "$(ls "$DIR"/sdist/llama_cpp_python-*.tar.gz | head -1)"); [ -n "$c" ] && echo "llama.cpp commit: $c" >> "$DIR/VERSION"
  fi
  echo "$BIN"; exit 0
fi
mkdir -p "$DIR" && cd "$DIR"
# The sdist straight from the registry's JSON API: `pip download --no-binary :all:` would build the
# package's build dependencies (cmake among them) from source just to read its metadata.
[ -n "$(ls sdist/llama_cpp_python-*.tar.gz 2>/dev/null)" ] || python3 - <<'PY'
import json, os, urllib.parse, urllib.request
api = os.environ.get("PYPI_JSON", "https://pypi.org/pypi/llama-cpp-python/json")
info = json.load(urllib.request.urlopen(api, timeout=60))
sdist = next(u for u in info["urls"] if u["packagetype"] == "sdist")
os.makedirs("sdist", exist_ok=True)
urllib.request.urlretrieve(urllib.parse.urljoin(api, sdist["url"]), os.path.join("sdist", sdist["filename"]))
PY
SDIST=$(ls sdist/llama_cpp_python-*.tar.gz | head -1)
rm -rf src && mkdir src && tar xzf "$SDIST" -C src --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
COMMIT=$(vendored_commit "$SDIST")
{ echo "llama-cpp-python sdist: $(basename "$SDIST")"; echo "llama.cpp commit: ${COMMIT:-unknown (no submodule HEAD in the sdist)}"; } > VERSION
cd src
# -march=native, except where the CPU lists AMX: ggml then compiles its AMX matmul, which died of
# SIGILL on a VM that lists amx_tile (measured 2026-12-03, Intel Xeon); there the ISA is named flag by
# flag from /proc/cpuinfo without AMX.
ISA=(-DGGML_NATIVE=ON)
if [[ " $CPU_FLAGS " == *" amx_tile "* ]]; then
  has() { [[ " $CPU_FLAGS " == *" $1 "* ]] && echo ON || echo OFF; }
  ISA=(-DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
       -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
       -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
       -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
echo "cmake ISA: ${ISA[*]}" >> "$DIR/VERSION"
# the sdist has no git work tree, so llama.cpp's build info would say "unknown": name the commit
INFO=(); [ -n "$COMMIT" ] && INFO=(-DLLAMA_BUILD_COMMIT="${COMMIT:0:9}")
cmake -B build -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" "${INFO[@]}" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON > build.log 2>&1
cmake --build build --target "${TOOLS[@]}" -j"$(nproc)" >> build.log 2>&1
echo "$CPU_FLAGS" > "$DIR/BUILT_FOR"
echo "$BIN"
