#!/usr/bin/env bash
# Installs msae into ./.venv on a fresh Debian machine:
#   system packages: Debian's fortunes files (the embedded English corpus and, in several languages,
#   the offline probing data) and chromium (static figure export through kaleido, browser tests);
#   PyTorch pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
#   the package itself, with the test tools when called with --test.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

debs=(fortunes fortunes-min fortunes-de fortunes-es fortunes-it chromium)
missing=()
for d in "${debs[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if ((${#missing[@]})); then
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  # another apt (unattended upgrades on a fresh machine) may hold the dpkg lock: wait for it
  lock=(-o DPkg::Lock::Timeout=600)
  $sudo apt-get "${lock[@]}" update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get "${lock[@]}" install -y -q "${missing[@]}"
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${MSAE_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".${extras}"
echo "msae installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
