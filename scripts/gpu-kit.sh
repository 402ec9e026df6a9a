#!/usr/bin/env bash
# Prepare the one GPU call that fills benchmarks/REPORT.md section 4 (benchmarks/mfu.py, torchtitan beside).
#
#   scripts/gpu-kit.sh            # download the wheels into .whl/, check their size, print the run command
#   scripts/gpu-kit.sh --command  # print the run command only
#
# The lent GPU machine (one H200; python3 3.12, torch 2.11.0+cu130, no network) lacks torchao (float8),
# torchtitan and the packages torchtitan imports that its image does not hold. They travel as wheels in
# .whl/ (git-ignored), named in the call's `carry`; neoxt itself travels as source (PYTHONPATH=src: the
# benchmark imports only torch, numpy, pyyaml and tqdm from outside neoxt, all in the image).
# Versions are pinned; each was chosen for the image's torch 2.11:
#   torchao 0.17.0       float8 training (needs torch >= 2.11 for its C++ parts; float8 is Python + Triton)
#   torchtitan 0.2.2     the peer, built 2026-02-20 beside torch 2.11 (0.3.0 imports DataParallelMeshDims,
#                        which torch gained after 2.11, so it cannot load there); its Requires-Dist minus
#                        the image's packages: torchdata 0.11.0, tyro 1.0.17 (+ docstring-parser,
#                        typeguard, typing_extensions >= 4.13), datasets 4.7.0 (imported by its trainer;
#                        + dill, multiprocess, and fsspec 2026.2.0, the newest datasets 4.7 accepts).
#                        tensorboard, einops, pillow, tokenizers are in the
#                        image; tomli is not needed on Python 3.12.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

WHEELS=(
  torchao==0.17.0
  torchtitan==0.2.2 torchdata==0.11.0
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing_extensions==4.15.0
  datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 fsspec==2026.2.0
)
LIMIT_MIB=50

run_command() {
  # The exact command for the device tool's `run` (carry: [".whl"], timeout_s: 560). Under 2,000 chars.
  cat <<'EOF'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit; set -o pipefail; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee $OUT/env.txt; python3 -c "import torch,torchao,torchtitan,torchtitan.train;print('torch',torch.__version__,'torchao',torchao.__version__,'torchtitan',torchtitan.__version__)" 2>&1 | tee -a $OUT/env.txt; PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 500 python3 benchmarks/mfu.py --peer torchtitan --budget-s 440 --json $OUT/mfu.json --markdown $OUT/mfu.md --peer-log $OUT/titan.log 2>&1 | tee $OUT/mfu.log
EOF
}

if [[ "${1:-}" == "--command" ]]; then
  run_command
  exit 0
fi

git check-ignore -q .whl/probe.whl || { echo "gpu-kit: .whl/ is not git-ignored (add /.whl/ to .gitignore)" >&2; exit 2; }
mkdir -p .whl
PY="${PYTHON:-}"
[[ -n "$PY" ]] || { [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; }
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -q -d .whl "${WHEELS[@]}"

# One version of each package: two stop the whole install on the device.
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z "$dups" ]] || { echo "gpu-kit: more than one wheel of: $dups (empty .whl/ and rerun)" >&2; exit 2; }

ls -l .whl/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $(awk -v b="$total" 'BEGIN{printf "%.2f", b / 1048576}') MiB in $(ls .whl/*.whl | wc -l) wheels (limit ${LIMIT_MIB} MiB; the call carries at most 64)"
(( total <= LIMIT_MIB * 1048576 )) || { echo "gpu-kit: wheels exceed ${LIMIT_MIB} MiB" >&2; exit 2; }
echo
echo "run (carry [\".whl\"], timeout_s 560):"
run_command
