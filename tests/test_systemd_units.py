"""The systemd units in deploy/systemd/, started the way systemd would start them: each unit's own ExecStart, with
only the environment the unit sets (``env -i``), a private temporary folder (as ``PrivateTmp=yes`` gives), the
documented paths mapped into a temporary folder. Then what ``Restart=on-failure`` and ``systemctl stop`` rely on:
a SIGKILLed service started again rejoins, and SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from deployment import BIN, REPO, LocalDeployment, read_run, wait_for

pytestmark = pytest.mark.slow

UNITS = REPO / "deploy" / "systemd"


def read_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit file: key → every value it is given (Environment= repeats)."""
    service: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            service.setdefault(key, []).append(value)
    return service


class Unit:
    """One unit's service, its documented paths replaced by ``paths``; ``start`` runs it as systemd would."""

    def __init__(self, name: str, paths: dict[str, str], root: Path):
        text = (UNITS / name).read_text()
        for documented in sorted(paths, key=len, reverse=True):
            text = text.replace(documented, paths[documented])
        self.file = root / name
        self.file.write_text(text)
        self.service = read_unit(self.file)
        self.root, self.name = root, name
        self.proc: subprocess.Popen | None = None

    @property
    def environment(self) -> dict[str, str]:
        env = dict(v.split("=", 1) for v in self.service.get("Environment", []))
        tmp = self.root / f"{self.name}.tmp"  # PrivateTmp=yes: a temporary folder of its own
        tmp.mkdir(exist_ok=True)
        return {**env, "TMPDIR": str(tmp)}

    def start(self) -> subprocess.Popen:
        log = open(self.root / f"{self.name}.log", "a")
        self.proc = subprocess.Popen(shlex.split(self.service["ExecStart"][0]), env=self.environment, cwd="/",
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def signal(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=60)

    def log(self) -> str:
        return (self.root / f"{self.name}.log").read_text(errors="replace")


@pytest.fixture
def units(tmp_path):
    d = LocalDeployment(tmp_path, sites=1)
    var = tmp_path / "var"  # StateDirectory=fedvision
    var.mkdir()
    paths = {"/opt/fedvision/.venv/bin": str(BIN), "/opt/fedvision/site-bin": str(d.site_bin),
             "/etc/fedvision/certs": str(d.certs), "/var/lib/fedvision": str(var), "/data/derm": str(d.data / "site-1"),
             "superlink.example.org:443": d.address, "--port 8000": f"--port {d.port}"}
    coordinator = Unit("fedvision-coordinator.service", paths, tmp_path)
    site = Unit("fedvision-site.service", paths, tmp_path)
    yield d, coordinator, site
    for unit in (site, coordinator):
        if unit.proc is not None and unit.proc.poll() is None:
            unit.signal(signal.SIGKILL)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemds_own_check(units):
    _, coordinator, site = units
    for unit in (coordinator, site):
        check = subprocess.run(["systemd-analyze", "verify", str(unit.file)], capture_output=True, text=True)
        problems = [line for line in (check.stdout + check.stderr).splitlines()
                    if unit.file.name in line and "User=" not in line]  # the 'fedvision' user exists only in production
        assert not problems, problems


def test_units_start_run_survive_a_sigkill_and_stop_cleanly(units, tmp_path):
    d, coordinator, site = units
    for unit in (coordinator, site):
        env = unit.environment
        assert set(env) == {"PATH", "FLWR_HOME", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "TMPDIR"}
        assert "ProtectSystem" in unit.service and unit.service["PrivateTmp"] == ["yes"]
    d.superlink = coordinator.start()
    wait_for(d._listening, 60, "the SuperLink (unit) to listen")
    d.register("site-1")
    site.start()
    wait_for(lambda: d.node_status().count("online") == 1, 90, "the SuperNode (unit) online")

    # A run: the SuperNode finds flower-superexec and the site's launcher on the unit's PATH, trains in its
    # private temporary folder, and keeps Flower's files in the unit's FLWR_HOME.
    run_dir = tmp_path / "run"
    proc = d.flwr_run(d.run_config(run_dir, **{"num-server-rounds": 1, "min-train-nodes": 1,
                                               "min-available-nodes": 1}))
    assert proc.wait(timeout=300) == 0, d.log("flwr-run")[-3000:]
    record = read_run(run_dir)
    assert record["status"] == "completed" and record["rounds"][0]["accepted"] == ["site-1"], record
    assert any((tmp_path / "var" / "flwr-home" / "apps").iterdir())  # the approved app, unpacked in FLWR_HOME

    # Restart=on-failure after a SIGKILL: started again (systemd retries while the SuperLink still counts the
    # old connection), the site rejoins; the coordinator restarted on its database knows the site's key.
    assert site.signal(signal.SIGKILL) == -signal.SIGKILL
    assert coordinator.signal(signal.SIGKILL) == -signal.SIGKILL
    d.superlink = coordinator.start()
    wait_for(d._listening, 60, "the SuperLink (unit) to listen again")

    def restarted_site_online() -> bool:
        if site.proc.poll() is not None:
            site.start()  # what Restart=on-failure does (without waiting RestartSec)
        return d.node_status().count("online") == 1

    site.start()
    wait_for(restarted_site_online, 180, "the restarted SuperNode online", interval=3)

    # systemctl stop: SIGTERM, and each stops of its own accord.
    assert site.signal(signal.SIGTERM) in (0, -signal.SIGTERM), site.log()[-2000:]
    assert coordinator.signal(signal.SIGTERM) in (0, -signal.SIGTERM), coordinator.log()[-2000:]
