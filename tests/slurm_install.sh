#!/usr/bin/env bash
# Install a single-node Slurm (Debian 12 / Slurm 22.05) + MUNGE for the
# real-cluster tests in tests/test_slurm*.py (fixture: tests/slurmcluster.py).
#
# Idempotent and non-interactive: does nothing when every binary is present.
# Needs root (apt). Only installs packages; it starts no daemon: the pytest
# fixture starts private munged/slurmctld/slurmd instances under a temp dir.
set -euo pipefail

need=(munged slurmctld slurmd sbatch scontrol sinfo squeue scancel)
missing=()
for b in "${need[@]}"; do
    if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then
        missing+=("$b")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "slurm_install.sh: slurm + munge already installed"
    exit 0
fi
echo "slurm_install.sh: missing ${missing[*]}; installing slurm packages"

if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
else
    SUDO=""
fi
export DEBIAN_FRONTEND=noninteractive
# Package postinst scripts try to start the services; in containers
# invoke-rc.d/policy-rc.d usually refuses, which is fine (the fixture starts
# its own daemons). Output goes to a log; show its tail on failure.
log="$(mktemp /tmp/slurm_install.XXXXXX.log)"
if ! { $SUDO apt-get update -q \
       && $SUDO apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            slurmctld slurmd slurm-client munge ; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "slurm_install.sh: apt-get install failed (full log: $log)" >&2
    exit 1
fi
rm -f "$log"
# The postinst may have started system daemons where an init system exists;
# the fixture uses its own sockets/ports, so they do not clash.
echo "slurm_install.sh: installed $(slurmd -V 2>/dev/null || echo slurm)"
