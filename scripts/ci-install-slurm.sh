#!/usr/bin/env bash
# Install SLURM + munge (Debian packages) for the real one-node SLURM test in tests/distributed.
# Takes ~10 s; starts no daemon (the test fixture starts and stops its own cluster by pid).
# Safe to re-run; a no-op when the tools are already there. Needs root (apt-get).
set -euo pipefail
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ci-install-slurm: not root, cannot apt-get install slurm-wlm munge (the SLURM test will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || true
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "ci-install-slurm: installed $(sbatch --version)"
