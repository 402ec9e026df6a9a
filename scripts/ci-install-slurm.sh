#!/usr/bin/env bash
# Install SLURM + munge, and slurmdbd + MariaDB for accounting (Debian packages), for the real one-node
# SLURM tests in tests/distributed (`sacct`, hence `neoxt cluster usage`, needs slurmdbd + a database).
# Takes ~20 s; starts no daemon (the test fixture starts and stops its own cluster and database by pid).
# Safe to re-run; a no-op when the tools are already there. Needs root (apt-get).
set -euo pipefail
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ci-install-slurm: not root, cannot apt-get install slurm-wlm munge slurmdbd mariadb-server" \
        "(the SLURM tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || true
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# Accounting is optional: without it the SLURM tests still run and `cluster usage` checks its error.
apt-get install -y -qq --no-install-recommends slurmdbd mariadb-server >/dev/null \
    || echo "ci-install-slurm: slurmdbd/mariadb-server not installed; sacct-based tests check the error path" >&2
echo "ci-install-slurm: installed $(sbatch --version)"
