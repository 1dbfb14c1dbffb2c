#!/bin/sh
# /usr/local/bin/device-agent: every field command runs the way the service runs.
#
# As the service's user, with the service's settings file read by the agent's own parser
# (--env-file; nothing here sources it as shell, so quoting means the same for both), and
# with the service's credentials: a private copy of /etc/device-agent/credentials that only
# that user can read, handed over as $CREDENTIALS_DIRECTORY (what LoadCredential= does for
# the service) and removed when the command ends. So `sudo device-agent sync --once`,
# `verify`, `doctor` and `capture` see exactly what the service sees.
# The DEVICE_AGENT_* variables exist for tests; a unit never sets them.
set -eu
ENV_FILE=${DEVICE_AGENT_ENV_FILE:-/etc/device-agent/device-agent.env}
BIN=${DEVICE_AGENT_BIN:-/opt/device-agent/venv/bin/device-agent}
CREDENTIALS=${DEVICE_AGENT_CREDENTIALS:-/etc/device-agent/credentials}
SERVICE_USER=${DEVICE_AGENT_USER:-device-agent}
STATE=${DEVICE_AGENT_STATE:-/var/lib/device-agent}
RUNTIME=${DEVICE_AGENT_RUNTIME:-/run}

if [ "$(id -u)" != 0 ]; then
    echo "device-agent: run with sudo (commands run as the $SERVICE_USER user, with its credentials)" >&2
    exit 2
fi
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    echo "device-agent: service user $SERVICE_USER does not exist: run systemd/install.sh" >&2
    exit 2
fi

creds=$(mktemp -d "$RUNTIME/device-agent-cli.XXXXXX")
cleanup() { rm -rf "$creds"; }
trap cleanup EXIT
trap : INT TERM  # the command gets the signal and exits; then the copy is removed
chmod 0700 "$creds"
if [ -d "$CREDENTIALS" ]; then
    for cred in "$CREDENTIALS"/*; do
        [ -f "$cred" ] || continue
        cp "$cred" "$creds/"
    done
fi
chown -R "$SERVICE_USER" "$creds"
chmod 0400 "$creds"/* 2>/dev/null || true

cd "$STATE" 2>/dev/null || cd /
set +e
runuser -u "$SERVICE_USER" -- env CREDENTIALS_DIRECTORY="$creds" \
    "$BIN" --env-file "$ENV_FILE" "$@"
status=$?
exit "$status"
