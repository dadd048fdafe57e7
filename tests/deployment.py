"""A real Flower deployment on loopback, for the deployment tests: the same commands docs/deployment.md gives.

``LocalDeployment`` makes certificates with ``fedvision certs``, site data with ``fedvision data synth``, approves this checkout
at every site and writes the site launcher (``fedvision site approve`` / ``launcher``), starts
``flower-superlink`` (TLS, SuperNode authentication, a database file) on a free port, registers site keys with
``flwr supernode register``, starts ``flower-supernode`` processes, and runs the app with ``flwr run``. Every
process gets its own session, so a SIGKILL takes down a whole "machine" (SuperNode and its ClientApp).
``start_proxy`` puts nginx in front of the SuperLink with the configuration docs/deployment.md gives, verbatim.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "hospital-network"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class LocalDeployment:
    def __init__(self, root: Path, sites: int, per_site: int = 80, test_size: int = 60):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = root / "certs"
        self.data = root / "data"
        self.flwr_home = root / "flwr-home"
        self.superlink: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.fedvision("certs", "--out", str(self.certs), "--sites", str(sites))
        self.fedvision("data", "synth", "--out", str(self.data), "--sites", str(sites), "--per-site", str(per_site),
                       "--test-size", str(test_size))
        # Every site runs only the app it approved: this checkout, through the launcher (docs/deployment.md).
        self.approved = root / "approved-apps.txt"
        self.site_bin = root / "site-bin"
        self.fedvision("site", "approve", str(REPO), "--approved", str(self.approved))
        self.fedvision("site", "launcher", "--bin", str(self.site_bin), "--approved", str(self.approved))
        self.flwr_home.mkdir(parents=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    # -- commands ----------------------------------------------------------------------------------------
    def fedvision(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "fedvision"), *args], env=self.env, check=True, capture_output=True,
                              text=True, timeout=300)

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, check=check, capture_output=True, text=True,
                              timeout=120)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, cwd=self.root,
                                start_new_session=True)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the coordinator ---------------------------------------------------------------------------------
    def start_superlink(self) -> None:
        self.superlink = self._spawn("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.crt"), "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth", "--database", str(self.root / "superlink.db"), "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation"])
        wait_for(lambda: self._listening(), 60, "the SuperLink to listen")

    def _listening(self) -> bool:
        if self.superlink is not None and self.superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited ({self.superlink.returncode}):\n"
                               f"{self.log('superlink')[-3000:]}")
        return _accepts(self.port)

    def start_proxy(self) -> str:
        """nginx with docs/deployment.md's server block (only its paths and ports replaced) in front of the
        SuperLink; returns the address sites use."""
        docs = (REPO / "docs" / "deployment.md").read_text()
        block = re.search(r"```nginx\n(.*?)```", docs, re.S).group(1)
        port, prefix = free_port(), self.root / "nginx"
        for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                         ("/etc/fedvision/certs/", f"{self.certs}/"),
                         ("https://127.0.0.1:8000", f"https://{self.address}")):
            assert old in block, f"docs/deployment.md's nginx block no longer has {old!r}"
            block = block.replace(old, new)
        temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
        (prefix / "logs").mkdir(parents=True)
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\nevents {{}}\n"
            f"http {{\naccess_log {prefix}/logs/access.log;\n{temp}\n{block}}}\n")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proxy = self._spawn("nginx", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                           "-g", "daemon off;"])
        wait_for(lambda: self.proxy.poll() is None and _accepts(port), 30, "nginx to listen")
        return f"127.0.0.1:{port}"

    def proxy_log(self) -> str:
        return (self.root / "nginx" / "logs" / "access.log").read_text()

    def site_cli(self, superlink: str, *args: str) -> subprocess.CompletedProcess:
        """The Flower CLI on a site's machine: its own Flower home, only the federation's ca.crt, pointed at
        ``superlink``."""
        home = self.root / "site-cli-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "{superlink}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        return subprocess.run([str(BIN / "flwr"), *args], env={**self.env, "FLWR_HOME": str(home)},
                              capture_output=True, text=True, timeout=120)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and the ServerApp it runs: the coordinator's machine dies."""
        _kill_group(self.superlink)

    def register(self, site: str) -> None:
        self.flwr("supernode", "register", str(self.certs / f"{site}.pub"), FEDERATION, "--name", site)

    def node_status(self) -> list[str]:
        out = self.flwr("supernode", "list", FEDERATION, "--format", "json").stdout
        return [n["status"] for n in json.loads(out[out.index("{"):])["nodes"]]

    # -- sites -------------------------------------------------------------------------------------------
    def start_node(self, site: str, *, tls: bool = True, superlink: str | None = None,
                   **node_config: Any) -> subprocess.Popen:
        """``flower-supernode`` for ``site`` reading its own manifest; its ledger lives in ``root/state/site``.
        ``superlink``: the address it connects to (default: the SuperLink's own)."""
        config = {"data": f"manifest:{self.data / site / 'manifest.csv'}", "state-dir": str(self.state_dir(site)),
                  "site-name": site, "epsilon-budget": 8.0, "delta": 1e-5, **node_config}
        cmd = [str(BIN / "flower-supernode"), "--superlink", superlink or self.address,
               "--port", str(free_port()), "--max-retries", "1000",
               "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())]
        # Flower itself refuses an authentication key without TLS, so a plaintext node comes without one.
        cmd += ["--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key",
                str(self.certs / f"{site}.key")] if tls else ["--insecure"]
        # The site's launcher comes first on PATH, so Flower runs it as flwr-clientapp.
        env = {**self.env, "PATH": f"{self.site_bin}{os.pathsep}{self.env['PATH']}"}
        self.nodes[site] = self._spawn(site, cmd, env)
        return self.nodes[site]

    def state_dir(self, site: str) -> Path:
        return self.root / "state" / site

    def kill_node(self, site: str) -> None:
        _kill_group(self.nodes.pop(site))

    def ledger(self, site: str, records: str = "training") -> list[dict]:
        """One record set's entries of the site's ledger (training: one per round trained)."""
        path = self.state_dir(site) / "ledger.json"
        entries = json.loads(path.read_text())["entries"] if path.exists() else []
        return [e for e in entries if e.get("records", "training") == records]

    # -- runs --------------------------------------------------------------------------------------------
    def run_config(self, run_dir: Path, **overrides: Any) -> Path:
        values = {"dataset": "", "test-dataset": f"manifest:{self.data / 'test' / 'manifest.csv'}",
                  "run-dir": str(run_dir), "min-train-nodes": 2, "min-available-nodes": 2, "round-timeout": 120.0,
                  **overrides}
        path = run_dir.parent / f"{run_dir.name}.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return path

    def flwr_run(self, config: Path, name: str = "flwr-run", app: Path = REPO) -> subprocess.Popen:
        return self._spawn(name, [str(BIN / "flwr"), "run", str(app), FEDERATION, "--stream",
                                  "--run-config", str(config)])

    def close(self) -> None:
        for site in list(self.nodes):
            _kill_group(self.nodes.pop(site), signal.SIGTERM)
        _kill_group(self.superlink, signal.SIGTERM)
        _kill_group(self.proxy, signal.SIGTERM)


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def _kill_group(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_run(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())
