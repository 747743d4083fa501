#!/usr/bin/env bash
# Install the Debian packages the cluster tests start for real (root, apt); .ci/run calls this:
#   slurm-wlm, munge        tests/e2e/test_slurm.py, tests/e2e/test_slurm_multinode.py
#   openssh-server, rsync   tests/e2e/test_ray_multinode.py (an sshd per namespace node; `ray up` copies with rsync)
# Without them those tests skip and say why.
set -uo pipefail
missing=()
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
if [ "${#missing[@]}" = 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_local_slurm: not root or no apt-get; tests needing ${missing[*]} will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# (a host with systemd starts its own sshd on install; the tests run theirs on the namespace nodes only)
if ! { apt-get update -q && apt-get install -y -q "${missing[@]}"; } >/tmp/install_local_slurm.log 2>&1; then
  echo "install_local_slurm: apt-get install ${missing[*]} failed (tail of /tmp/install_local_slurm.log below);" \
    "the tests needing them will skip" >&2
  tail -n 20 /tmp/install_local_slurm.log >&2
fi
exit 0
