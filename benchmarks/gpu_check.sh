#!/usr/bin/env bash
# The checks and figures that need a CUDA GPU, in one go (gen3d installed, nvcc + ninja on PATH):
#   bash benchmarks/gpu_check.sh OUTDIR [PART ...]    parts (default all): build tests packed batched guidance
# build:    builds nerfacc's CUDA extension (timed; a few minutes the first time)
# tests:    the test suite on the GPU machine (cuda-marked tests run; recipes pick CUDA themselves)
# packed:   reconstruction benchmark on nerfacc's packed CUDA path
# batched:  the same on the torch-packed path (GEN3D_NERFACC_CUDA=0), for comparison
# guidance: text-to-3D steps with Stable Diffusion 2.1-base-sized random models in fp16
#           (seconds a step, peak VRAM) at batch 1 and 4, and with the tiny models; image-to-3D
#           steps with a Zero-1-to-3 XL-sized random model in fp16.
# Each step writes its JSON or log into OUTDIR.
set -u -o pipefail
out=${1:?usage: gpu_check.sh OUTDIR [build tests packed batched guidance]}
shift
parts=" ${*:-build tests packed batched guidance} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$out/env.txt"

if [[ $parts == *" build "* ]]; then
  start=$(date +%s)
  python3 -c "from gen3d.render import nerfacc_cuda_available as a; print('nerfacc cuda:', a())" 2>&1 | tail -5 | tee -a "$out/env.txt"
  echo "nerfacc build+load seconds: $(( $(date +%s) - start ))" | tee -a "$out/env.txt"
fi
if [[ $parts == *" tests "* ]]; then
  python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -15 | tee "$out/pytest.txt"
fi
if [[ $parts == *" packed "* ]]; then
  python3 benchmarks/bench_reconstruct.py > "$out/reconstruct_packed.json" 2> "$out/reconstruct_packed.err"; tail -c 1500 "$out/reconstruct_packed.json"
fi
if [[ $parts == *" batched "* ]]; then
  GEN3D_NERFACC_CUDA=0 python3 benchmarks/bench_reconstruct.py > "$out/reconstruct_batched.json" 2> "$out/reconstruct_batched.err"; tail -c 1500 "$out/reconstruct_batched.json"
fi

if [[ $parts == *" guidance "* ]]; then
  python3 benchmarks/bench_text_to_3d.py --real-architecture --steps 12 --batches 1 4 > "$out/t23d_sd21.json" 2> "$out/t23d_sd21.err"; tail -c 2500 "$out/t23d_sd21.json"; tail -c 1500 "$out/t23d_sd21.err"
  python3 benchmarks/bench_text_to_3d.py --steps 20 > "$out/t23d_tiny.json" 2> "$out/t23d_tiny.err"; tail -c 2500 "$out/t23d_tiny.json"
  python3 benchmarks/bench_zero123_speed.py --real-architecture --steps 12 > "$out/i23d_zero123xl.json" 2> "$out/i23d_zero123xl.err"; tail -c 2500 "$out/i23d_zero123xl.json"; tail -c 1500 "$out/i23d_zero123xl.err"
fi
