#!/usr/bin/env bash
# The reference libraries that cannot share saelab's venv (their pins clash with it), each in its
# own venv at the path its test reads, so the interop tests compare against them instead of
# skipping. Never fails the run: a library that does not install leaves its test to skip, saying so.
#   bash .ci/reference_envs.sh          # PREFIX=/tmp by default
set -uo pipefail
cd "$(dirname "$0")/.."
prefix="${PREFIX:-/tmp}"
make_env() {  # name, then pip arguments
  local venv="$prefix/$1"; shift
  [ -x "$venv/bin/python" ] && return 0
  local t0=$SECONDS
  local log="$prefix/$(basename "$venv").install.log"
  if python3 -m venv "$venv" && "$venv/bin/pip" install -q -c constraints.txt "$@" >"$log" 2>&1; then
    "$venv/bin/pip" uninstall -q -y torchvision >/dev/null 2>&1  # its CUDA build breaks transformers' imports on CPU torch
    echo "reference env $venv ready ($((SECONDS - t0)) s)"
  else
    echo "reference env $venv did not install (log: $log); its tests will skip"; tail -5 "$log"
    rm -rf "$venv"
  fi
}
make_env dl-venv dictionary-learning==0.1.0
make_env saebench-venv sae-bench==0.6.0
make_env ct-venv circuit-tracer==0.5.0
exit 0
