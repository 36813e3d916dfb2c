#!/bin/sh
# Compile the CUDA backend of the patched library on a machine without a GPU: proves that the CUDA side of the
# patch series (0020's flash-attention kernels among it) builds with the nvcc this machine has. Nothing runs on a
# GPU here; scripts/device_check.sh does that when one is lent.
#
#   scripts/cuda_compile_check.sh          the flash-attention units and ggml-cuda.cu (minutes)
#   scripts/cuda_compile_check.sh --all    the whole CUDA library, linked (about an hour on 2 cores)
#
# A PyPI nvcc (nvidia-cuda-nvcc) comes without cuBLAS and without the driver's libcuda.so. When the toolkit lacks
# cuBLAS, its headers and library come from the nvidia-cublas wheel, fetched by name and pinned by hash below
# into ~/.cache/lminf_gguf/cuda; the driver's symbols are left to an empty stub library (enough to link a shared
# library). Nothing is installed system-wide. Build tree: build/cuda-check (ARCH=90 by default: sm_90).
set -e
cd "$(dirname "$0")/.."

CUBLAS_13="13.0.2.14"
CUBLAS_13_SHA256="0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c"

command -v nvcc >/dev/null || { echo "no nvcc on PATH (pip install nvidia-cuda-nvcc, or a CUDA toolkit)"; exit 1; }
NVCC_MAJOR=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
TOOLKIT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/lminf_gguf/cuda"
mkdir -p "$CACHE"
EXTRA=""

if ! find "$TOOLKIT" -name cublas_v2.h 2>/dev/null | grep -q .; then
    [ "$NVCC_MAJOR" = 13 ] || { echo "nvcc $NVCC_MAJOR without cuBLAS: only the cuBLAS for CUDA 13 is pinned here"; exit 1; }
    WHEEL="$CACHE/nvidia_cublas-$CUBLAS_13-py3-none-manylinux_2_27_x86_64.whl"
    if [ ! -f "$WHEEL" ]; then
        python3 -m pip download --quiet --no-deps --only-binary :all: -d "$CACHE" "nvidia-cublas==$CUBLAS_13"
    fi
    echo "$CUBLAS_13_SHA256  $WHEEL" | sha256sum -c --quiet || { echo "cuBLAS wheel: hash mismatch"; exit 1; }
    if [ ! -f "$CACHE/cublas/nvidia/cu13/include/cublas_v2.h" ]; then
        rm -rf "$CACHE/cublas" && python3 -m zipfile -e "$WHEEL" "$CACHE/cublas"
    fi
    LIBS="$CACHE/cublas/nvidia/cu13/lib"
    EXTRA="-DCUDA_cublas_LIBRARY=$LIBS/libcublas.so.13 -DCUDA_cublasLt_LIBRARY=$LIBS/libcublasLt.so.13"
    INC="-I$CACHE/cublas/nvidia/cu13/include"
fi
if ! find "$TOOLKIT" -name "libcuda.so*" 2>/dev/null | grep -q .; then
    [ -f "$CACHE/stubs/libcuda.so" ] || { mkdir -p "$CACHE/stubs" && echo "" | gcc -x c -shared -o "$CACHE/stubs/libcuda.so" -; }
    EXTRA="$EXTRA -DCUDA_cuda_driver_LIBRARY=$CACHE/stubs/libcuda.so"
fi

LAUNCH=""
command -v ccache >/dev/null && LAUNCH="-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache"
# shellcheck disable=SC2086
cmake -S . -B build/cuda-check -G Ninja -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}" \
    -DCMAKE_BUILD_TYPE=Release -DLMINF_RPC=off $LAUNCH $EXTRA \
    -DCMAKE_CUDA_FLAGS="${INC:-}" -DCMAKE_CXX_FLAGS="${INC:-}" > build/cuda-check.configure.log 2>&1 \
    || { tail -30 build/cuda-check.configure.log; exit 1; }

t0=$(date +%s)
if [ "$1" = "--all" ]; then
    ninja -C build/cuda-check ggml-cuda
else
    # every flash-attention unit (kernels and template instances) and the backend's dispatcher
    TARGETS=$(ninja -C build/cuda-check -t targets all | sed -n 's/^\(.*ggml-cuda.dir\/.*\(fattn[^/]*\|ggml-cuda\)\.cu\.o\): .*/\1/p')
    # shellcheck disable=SC2086
    ninja -C build/cuda-check $TARGETS
fi
echo "CUDA compile check ($(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${ARCH:-90}): done in $(( $(date +%s) - t0 )) s"
