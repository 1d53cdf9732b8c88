#!/usr/bin/env bash
# The GPU check (docs/performance.md, "The GPU path"): on a CUDA machine, time the standard S2L
# table and a Stable-Diffusion-v1-sized latent cell in bf16 autocast (benchmarks/gpu.py).
#
#   bash benchmarks/gpu.sh                 # full size
#   bash benchmarks/gpu.sh --stages latent # only the latent cell
#
# It uses the python3 that holds a CUDA build of torch ($PYTHON to name another) and runs the
# toolkit from this checkout. Packages the toolkit needs and that python lacks (often diffusers
# and opacus) are installed from PyPI, or, on a machine that reaches no registry, from the
# wheels in $WHEELS (fetch them elsewhere with `pip download --no-deps NAME`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import torch, sys; torch.cuda.is_available() or sys.exit("gpu.sh: this python sees no CUDA device; on a CPU run benchmarks/gpu.py --size smoke --device cpu")'
site=${TMPDIR:-/tmp}/s2l-guard-gpu-site
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
else
  missing=$("$PY" -c 'import importlib.util as u; print(" ".join(n for n in ("diffusers", "peft", "opacus", "sklearn", "safetensors", "matplotlib", "tqdm") if u.find_spec(n) is None))')
  [ -z "$missing" ] || "$PY" -m pip install -q --no-deps --target "$site" $(echo "$missing" | sed "s/sklearn/scikit-learn/")
fi
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu.py --device cuda "$@"
