#!/usr/bin/env bash
# Install Debian's slurm-wlm and munge (root, apt) so tests/e2e/test_slurm.py can start a real
# single-node SLURM cluster; .ci/run calls this. Without them those tests skip and say why.
set -uo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_local_slurm: not root or no apt-get; the SLURM tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q slurm-wlm munge; } >/tmp/install_local_slurm.log 2>&1; then
  echo "install_local_slurm: apt-get failed (tail of /tmp/install_local_slurm.log below); SLURM tests will skip" >&2
  tail -n 20 /tmp/install_local_slurm.log >&2
fi
exit 0
