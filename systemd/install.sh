#!/bin/sh
# Install device-agent on a board: service user, venv under /opt/device-agent, unit, settings.
# Run from a checkout as root: `sudo sh systemd/install.sh` (or `sudo make install`).
# DESTDIR=/some/dir stages every file under that folder instead (for packaging and tests);
# SKIP_USER=1, SKIP_PIP=1, SKIP_SYSTEMCTL=1 skip those steps. Safe to run again: an existing
# env file and credentials are kept.
set -eu

DESTDIR="${DESTDIR:-}"
PYTHON="${PYTHON:-python3}"
USER_NAME=device-agent
PREFIX=/opt/device-agent
SRC="$(cd "$(dirname "$0")/.." && pwd)"
ETC="$DESTDIR/etc/device-agent"

say() { printf 'install: %s\n' "$*"; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install: run as root (sudo sh systemd/install.sh), or set DESTDIR to stage" >&2
    exit 2
fi

if [ "${SKIP_USER:-}" != 1 ] && [ -z "$DESTDIR" ]; then
    if ! id "$USER_NAME" >/dev/null 2>&1; then
        say "creating system user $USER_NAME (group dialout for the serial port)"
        useradd --system --user-group --groups dialout --home-dir /var/lib/device-agent \
            --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
    else
        usermod -a -G dialout "$USER_NAME"
    fi
fi

say "copying the source to $DESTDIR$PREFIX/src"
mkdir -p "$DESTDIR$PREFIX/src" "$DESTDIR$PREFIX/docs"
tar -C "$SRC" --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.pytest_cache --exclude=state --exclude=reports -cf - \
    pyproject.toml README.md constraints.txt device_agent | tar -C "$DESTDIR$PREFIX/src" -xf -
cp "$SRC"/docs/*.md "$DESTDIR$PREFIX/docs/" 2>/dev/null || true

if [ "${SKIP_PIP:-}" != 1 ]; then
    say "creating the venv $DESTDIR$PREFIX/venv"
    "$PYTHON" -m venv "$DESTDIR$PREFIX/venv"
    "$DESTDIR$PREFIX/venv/bin/python" -m pip install --quiet \
        -c "$DESTDIR$PREFIX/src/constraints.txt" "$DESTDIR$PREFIX/src"
fi

say "installing the unit"
install -D -m 0644 "$SRC/systemd/device-agent.service" \
    "$DESTDIR/etc/systemd/system/device-agent.service"

# Settings: read by the agent itself as the service user (root:device-agent 0640; they hold
# no secret). Credentials: root only; systemd and the wrapper hand them over.
install -d -m 0750 "$ETC"
install -d -m 0700 "$ETC/credentials"
if [ ! -e "$ETC/device-agent.env" ]; then
    say "writing the example settings $ETC/device-agent.env (edit it: bucket, serial)"
    install -m 0640 "$SRC/systemd/device-agent.env.example" "$ETC/device-agent.env"
else
    say "keeping the existing $ETC/device-agent.env"
    chmod 0640 "$ETC/device-agent.env"
fi
for key in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_IOT_KEY_FILE; do
    if [ ! -e "$ETC/credentials/$key" ]; then
        (umask 077 && : > "$ETC/credentials/$key")  # empty: not given (LoadCredential needs it)
    fi
    chmod 0600 "$ETC/credentials/$key"
done
if [ -z "$DESTDIR" ] && id "$USER_NAME" >/dev/null 2>&1; then
    chgrp "$USER_NAME" "$ETC" "$ETC/device-agent.env"
fi

say "installing the field-command wrapper /usr/local/bin/device-agent"
install -D -m 0755 "$SRC/systemd/device-agent-wrapper.sh" "$DESTDIR/usr/local/bin/device-agent"

if [ "${SKIP_SYSTEMCTL:-}" != 1 ] && [ -z "$DESTDIR" ]; then
    systemctl daemon-reload
    systemctl enable device-agent.service
    say "enabled; after editing $ETC/device-agent.env run: systemctl start device-agent"
fi
say "done"
