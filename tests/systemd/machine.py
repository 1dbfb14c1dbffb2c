"""A Debian 12 machine booted with systemd as PID 1 (systemd-nspawn), driven from the host.

The root is built once with mmdebstrap and cached under the clone's ignored `.cache/`,
keyed by what goes into it (suite, mirror, packages, mmdebstrap's version); each run boots a
fresh copy of it. The container shares the host's network: 127.0.0.1 inside is the host's
loopback, where the tests' moto server and fault proxy listen. Commands go in with
`nsenter -a` and a clean environment. Flags from a trial on these hosts (issue 27):
`--register=no --keep-unit` (no system bus or machined on the host), `--console=read-only`
(`passive` can hang the boot), SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1, and
`--system-call-filter=bpf --capability=CAP_BPF` so the unit's DeviceAllow= is enforced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "apt"
# What an operator's Debian 12 board has that the agent and the tier use: systemd as init,
# dbus (systemctl's bus), python3 with venv (install.sh), sudo (the wrapper), passwd
# (useradd in install.sh), util-linux's nsenter/runuser come with the essential set.
PACKAGES = ("systemd", "dbus", "python3", "python3-venv", "sudo", "passwd")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"systemd-nspawn": "systemd-container", "mmdebstrap": "mmdebstrap",
         "nsenter": "util-linux"}  # tool -> its Debian package


def missing() -> str | None:
    """What this host lacks to boot the tier's machine, in one phrase, or None."""
    lacking = []
    if os.geteuid() != 0:
        lacking.append("root")
    lacking += [f"{tool} ({package})" for tool, package in TOOLS.items()
                if shutil.which(tool) is None]
    if not (Path("/sys/fs/cgroup/unified/cgroup.procs").exists()
            or Path("/sys/fs/cgroup/cgroup.procs").exists()):
        lacking.append("a cgroup2 hierarchy")
    return ", ".join(lacking) or None


def root_key() -> str:
    """What the cached root is made of: a new package list or mmdebstrap builds a new one."""
    version = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    text = "\n".join([SUITE, MIRROR, VARIANT, *PACKAGES, version, "host-ca-pip.conf"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_root(cache: Path) -> tuple[Path, float]:
    """The cached root (built now if absent) and how long building it took (0 if cached)."""
    base = cache / root_key()
    done = base / "complete"
    if done.exists():
        return base / "root", 0.0
    started = time.monotonic()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    work = base / "root.partial"
    log = base / "mmdebstrap.log"
    with log.open("w") as out:
        proc = subprocess.run(["mmdebstrap", f"--variant={VARIANT}",
                               f"--include={','.join(PACKAGES)}", SUITE, str(work), MIRROR],
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({proc.returncode}); see {log}")
    # pip in the root trusts what the host trusts (an egress proxy's CA, if any): the host's
    # bundle at the path Debian's OpenSSL reads, and pip told to use it.
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        (work / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle, work / "etc/ssl/certs/ca-certificates.crt")
        (work / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    work.rename(base / "root")
    done.write_text(f"{time.time()}\n")
    return base / "root", time.monotonic() - started


class Machine:
    """One booted copy of the root; `run()` executes a command inside as root or a user."""

    def __init__(self, root: Path, name: str, *, binds: Sequence[tuple[Path, str]] = ()) -> None:
        self.root = root
        self.name = name
        self.binds = list(binds)
        self.log_path = root.parent / f"{name}.console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    # --- boot and power-off --------------------------------------------------------------

    def boot(self, timeout: float = 120.0) -> float:
        """Boot with systemd as PID 1 and wait for `running` (or `degraded`); seconds taken."""
        started = time.monotonic()
        cmd = ["systemd-nspawn", "-D", str(self.root), "-M", self.name, "-b",
               "--register=no", "--keep-unit", "--console=read-only",
               "--system-call-filter=bpf", "--capability=CAP_BPF"]
        for host, inside in self.binds:
            cmd.append(f"--bind={host}:{inside}")
        env = {"PATH": PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-nspawn did not start: {self.console_tail()}")
            self.leader = self._child_of(self.proc.pid)
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("systemctl", "is-system-running", check=False, timeout=30)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"the machine did not boot (state {state!r}): "
                           f"{self.console_tail()}")

    @staticmethod
    def _child_of(pid: int) -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    return int(entry.name)
        return None

    def console_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def poweroff(self, timeout: float = 60.0) -> None:
        """Power off cleanly (SIGTERM makes nspawn ask PID 1 to halt); kill if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    # --- commands inside -----------------------------------------------------------------

    def run(self, *cmd: str, user: str | None = None, check: bool = True,
            timeout: float = 120.0, input: str | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside, with a clean environment, as root or (runuser) as `user`."""
        assert self.leader is not None, "boot first"
        inner: list[str] = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8"]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner, f"HOME=/home/{user}"]
        if cwd is not None:
            inner = ["sh", "-c", 'cd "$0" && exec "$@"', cwd, *inner]
        full = ["nsenter", "-a", "-t", str(self.leader), *inner, *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              input=input, env={"PATH": PATH})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, inside: str) -> Path:
        """A path inside the machine, as the host sees it (on its disk: not /run, /tmp, /dev)."""
        return self.root / inside.lstrip("/")
