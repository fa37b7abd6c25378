#!/usr/bin/env bash
# The benchmark's own environment: saelab plus the tools it is timed against (sae-lens,
# dictionary-learning, eai-sparsify), none of which is a test dependency.
#
#     bash benchmarks/setup_env.sh            # creates .bench-venv in the repo root
#     BENCH_VENV=/tmp/bv bash benchmarks/setup_env.sh
#
# Every install goes through benchmarks/constraints.txt, which pins torch (an unpinned
# requirement would pull a CUDA build) and the three tools' versions the adapters were written
# against. For the GPU mode (`throughput.py --device cuda`), point BENCH_CONSTRAINTS at a copy
# of that file whose torch line names the CUDA build you have (or can reach) instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BENCH_VENV:-$root/.bench-venv}"
constraints="${BENCH_CONSTRAINTS:-$root/benchmarks/constraints.txt}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q -c "$constraints")
"${pip[@]}" -e "$root" sae-lens dictionary-learning eai-sparsify
# dictionary-learning pulls torchvision, whose build beside this torch breaks `transformers`
# imports (and so sae-lens and sparsify); nothing timed here needs it.
"$venv/bin/python" -m pip uninstall -q -y torchvision || true
"$venv/bin/python" - <<'PY'
from importlib.metadata import version, PackageNotFoundError
for name in ["saelab", "torch", "sae-lens", "dictionary-learning", "eai-sparsify", "transformers"]:
    try:
        print(f"{name:20s} {version(name)}")
    except PackageNotFoundError:
        print(f"{name:20s} not installed")
import sae_lens, dictionary_learning, sparsify  # noqa: E401,F401  (fails loudly if an import is broken)
print("imports ok")
PY
