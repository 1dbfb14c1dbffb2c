#!/bin/sh
# /usr/local/bin/device-agent: field commands with the service's settings, as its user.
# `sudo device-agent status` reads the same settings and state as the running service.
# doctor runs as root so it can read the credentials the unit hands to the service.
set -eu
ENV_FILE=/etc/device-agent/device-agent.env
BIN=/opt/device-agent/venv/bin/device-agent
if [ "$(id -u)" != 0 ]; then
    echo "device-agent: run with sudo (the settings in $ENV_FILE are root-only)" >&2
    exit 2
fi
set -a
. "$ENV_FILE"
set +a
for arg in "$@"; do
    if [ "$arg" = doctor ]; then
        CREDENTIALS_DIRECTORY=/etc/device-agent/credentials exec "$BIN" --env-file /dev/null "$@"
    fi
done
cd /var/lib/device-agent 2>/dev/null || cd /
exec runuser -u device-agent -- "$BIN" --env-file /dev/null "$@"
