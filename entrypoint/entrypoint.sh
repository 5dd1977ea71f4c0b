#!/bin/sh
# The container's entry point, run by tini (PID 1, see the Dockerfile): make the writable
# folders, then become trainjob. `exec` keeps no shell in between, so the signals tini
# forwards (docker stop, Kubernetes' SIGTERM) reach the job directly: the first one stops
# training at the next batch end, saves resume state and exits 143.
#
# Everything the job writes lives under TRAINJOB_HOME (cache/, work/), with HOME,
# MPLCONFIGDIR and KERAS_HOME beside them; the image points them all into /tmp so that
# `docker run --read-only --tmpfs /tmp` and Kubernetes' readOnlyRootFilesystem work.
set -eu

if [ "${1:-}" = "train" ]; then
    for dir in "${TRAINJOB_HOME:-}" "${HOME:-}" "${MPLCONFIGDIR:-}"; do
        [ -n "$dir" ] || continue
        if ! mkdir -p "$dir" 2>/dev/null || [ ! -w "$dir" ]; then
            echo "trainjob: error: $dir is not writable by uid $(id -u): mount a writable" \
                "volume there (docker run --read-only --tmpfs /tmp ..., or an emptyDir in" \
                "Kubernetes), or set TRAINJOB_HOME to a writable folder" >&2
            exit 2
        fi
    done
fi

exec trainjob "$@"
