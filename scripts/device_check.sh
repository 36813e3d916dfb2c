#!/bin/sh
# GPU check on a machine without network (the device tool): CUDA build of the patched library through the same
# `pip install .` path, the ggml ops that the ceiling adds (CUDA against CPU), then the exactness tests and
# table with every layer offloaded. Figures go to $OUT (default /tmp/lminf-gpu).
#
# Needs: third_party/llama.cpp prepared (scripts/prepare_source.py), wheels of gguf, diskcache and
# llama-cpp-python's Python layer in .whl/, and python3 with torch, numpy, pytest, scikit-build-core.
set -e
OUT=${OUT:-/tmp/lminf-gpu}
SITE=/tmp/lminf-site
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --target $SITE .whl/*.whl

t0=$(date +%s)
# -DGGML_CUDA_FA_KQ_BIAS=ON compiles in the leading-column bias of the CUDA flash-attention kernels (off in a default
# CUDA build until this script has passed on a GPU), so that the checks below run it
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_KQ_BIAS=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $SITE . > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
echo "CUDA build (pip install ., $(nproc) cores): $(( $(date +%s) - t0 )) s" | tee "$OUT/build_time.txt"
ls $SITE/lminf_gguf/lib

LIB=$SITE/lminf_gguf/lib
g++ -O2 -std=c++17 third_party/llama.cpp/tests/test-backend-ops.cpp -Ithird_party/llama.cpp/ggml/include \
    -L$LIB -lggml-lminf -lggml-base-lminf -Wl,-rpath,$LIB -o /tmp/test-backend-ops
# FLASH_ATTN_EXT includes test_flash_attn_ext_kq_bias: "not supported" on a default CUDA build (without
# -DGGML_CUDA_FA_KQ_BIAS=ON), run against the CPU in this one
for op in ROPE CPY SUB MUL ADD SET SOFT_MAX SET_ROWS TOP_K GET_ROWS CONCAT SUM_ROWS RELU FLASH_ATTN_EXT; do
    /tmp/test-backend-ops test -o $op -b CUDA0 2>&1 | grep -E "tests passed|FAIL|Backend CUDA0" | tail -2
done | tee "$OUT/backend_ops.txt"

# patch 0020: the bias in the CUDA vec and tile kernels, against the CPU (every case must pass, none "not supported";
# "nseq=" selects test_flash_attn_ext_kq_bias: 0007's log-sum-exp cases, CPU only, are "not supported" on CUDA)
/tmp/test-backend-ops test -o FLASH_ATTN_EXT -p nseq= -b CUDA0 2>&1 \
    | grep -E "n_lead|tests passed|Backend CUDA0" | tee "$OUT/backend_ops_kq_bias.txt"
timeout 200 python3 benchmarks/exactness.py --n-gpu-layers 99 \
    --json "$OUT/exactness_gpu_fa.json" | tee "$OUT/exactness_gpu_fa.txt"
timeout 200 python3 benchmarks/exactness.py --n-gpu-layers 99 --topk-only \
    --json "$OUT/exactness_gpu_fa_topk.json" | tee "$OUT/exactness_gpu_fa_topk.txt"

cd tests
LMINF_N_GPU_LAYERS=99 timeout 240 python3 -m pytest -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/pytest_gpu.txt"
cd ..
timeout 200 python3 benchmarks/exactness.py --n-gpu-layers 99 --json "$OUT/exactness_gpu.json" | tee "$OUT/exactness_gpu.txt"
# speed of the paths with every layer on the GPU, the bias in flash attention on (carry results/austen.txt: the
# machine has no network for scripts/fetch_data.py)
if [ -f results/austen.txt ]; then
    timeout 200 python3 benchmarks/flash.py --threads 8 --n-gpu-layers 99 --rounds 1 \
        --text results/austen.txt \
        --only "lminf, flash on" "lminf, flash off" "mask, flash on" "shift, flash on" --json "$OUT/flash_gpu.json" \
        | tee "$OUT/flash_gpu.txt"
fi
