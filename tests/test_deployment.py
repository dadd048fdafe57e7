"""Deployment with real processes on loopback: ``flower-superlink`` with TLS, SuperNode authentication and a
database; ``flower-supernode`` per site reading its own manifest; ``flwr run``. Then the failures a
federation of hospitals meets: a site's machine dies mid-round, the coordinator's machine dies mid-run, and a
site sends poisoned updates.

What every run must show: the run record's rounds form one lineage of weights (each round's parent is the
previous round's result, across a resume too, and the files on disk are its end), and each site's ledger holds
exactly one charge per round it trained, against the weights that round sent — no ε lost, none counted twice.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from fedvision.models import load_model, state_digest
from fedvision.privacy import PrivacyLedger
from deployment import FEDERATION, REPO, LocalDeployment, read_run, wait_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 480  # seconds for one `flwr run` on 2 busy cores


@pytest.fixture
def deploy(tmp_path):
    made: list[LocalDeployment] = []

    def make(sites: int, **kwargs) -> LocalDeployment:
        d = LocalDeployment(tmp_path, sites, **kwargs)
        made.append(d)
        d.start_superlink()
        return d

    yield make
    for d in made:
        d.close()


def _start_sites(d: LocalDeployment, sites: list[str], node_configs: dict[str, dict] | None = None) -> None:
    for site in sites:
        d.register(site)
        d.start_node(site, **(node_configs or {}).get(site, {}))
    wait_for(lambda: d.node_status().count("online") == len(sites), 90, f"{len(sites)} SuperNodes online")


def _finish(d: LocalDeployment, proc, name: str = "flwr-run") -> None:
    code = proc.wait(timeout=RUN_TIMEOUT)
    assert code == 0, f"flwr run failed ({code}):\n{d.log(name)[-4000:]}\n--- superlink:\n{d.log('superlink')[-3000:]}"


def _check_lineage_and_ledgers(d: LocalDeployment, run_dir: Path, sites: list[str]) -> dict:
    """The properties every deployment run must have; returns the run record."""
    record = read_run(run_dir)
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    assert rounds[0]["parent_sha256"] == record["initial_sha256"]
    for before, after in zip(rounds, rounds[1:]):
        assert after["parent_sha256"] == before["global_sha256"], f"lineage broken at round {after['round']}"
    final = rounds[-1]["global_sha256"]
    assert state_digest(load_model(run_dir / "global_model.pt").state_dict()) == final
    assert state_digest(torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]) == final

    for site in sites:
        entries = [e for e in d.ledger(site) if e.get("run") == str(run_dir)]
        charged = [e["round"] for e in entries]
        assert len(charged) == len(set(charged)), f"{site}: a round was charged twice: {charged}"
        for e in entries:  # each charge is for the weights that round actually sent
            assert e["global_sha256"] == rounds[e["round"] - 1]["parent_sha256"]
        accepted = [r["round"] for r in rounds if site in r["accepted"]]
        assert set(accepted) <= set(charged), f"{site}: aggregated in rounds {accepted} but charged {charged}"
        ledger = PrivacyLedger(d.state_dir(site) / "ledger.json")
        assert record["sites"][site]["epsilon"] == pytest.approx(ledger.epsilon(record["sites"][site]["delta"]),
                                                                 rel=1e-9)
        assert record["sites"][site]["steps"] == ledger.steps
    return record


def test_tls_and_node_authentication_end_to_end(deploy, tmp_path):
    d = deploy(sites=5)
    sites = ["site-1", "site-2", "site-3"]
    _start_sites(d, sites, {"site-1": {"min-noise-multiplier": 0.8}})  # site-1's policy: a floor on σ
    d.start_node("site-4")  # its key was never registered
    d.register("site-5")
    d.start_node("site-5", tls=False)  # tries to connect without TLS (Flower allows no key without TLS)

    # The unregistered SuperNode is turned away at activation and exits.
    code = d.nodes["site-4"].wait(timeout=60)
    assert code != 0 and "Failed to activate SuperNode" in d.log("site-4")

    run_dir = tmp_path / "run"
    proc = d.flwr_run(d.run_config(run_dir, **{"num-server-rounds": 2, "min-train-nodes": 3,
                                               "min-available-nodes": 3}))
    _finish(d, proc)
    record = _check_lineage_and_ledgers(d, run_dir, sites)
    assert record["status"] == "completed" and record["completed_rounds"] == 2
    for r in record["rounds"]:
        assert sorted(r["accepted"]) == sites and r["aggregated"]
        assert sorted(r["evaluate"]["sites"]) == sites
    assert set(record["sites"]) == set(sites)
    # Neither the unauthenticated nor the plaintext node ever received a task: no ledger, never online.
    assert not d.ledger("site-4") and not d.ledger("site-5")
    assert d.node_status().count("online") == 3
    assert "Connection attempt failed" in d.log("site-5")
    assert record["config"]["dataset"] == "" and record["versions"]["flwr"].startswith("1.42")

    # The site owns its privacy policy (node config: ε budget 8, δ 1e-5, σ ≥ 0.8 for site-1): a run config asking
    # for less is refused by the site before it reads any data, named in run.json, and charges nothing.
    saved = {site: (d.state_dir(site) / "ledger.json").read_bytes() for site in sites}
    asks = {"dp=false": {"dp": False}, "delta=0.001": {"delta": 1e-3}, "noise-multiplier=0.5": {"noise-multiplier": 0.5}}
    for i, (asked, overrides) in enumerate(asks.items()):
        refused_dir = tmp_path / f"refused-{i}"
        proc = d.flwr_run(d.run_config(refused_dir, **{"num-server-rounds": 1, "min-train-nodes": 3,
                                                       "min-available-nodes": 3, **overrides}), name=f"refused-{i}")
        _finish(d, proc, f"refused-{i}")
        reasons = {r["site"]: r["reason"] for r in read_run(refused_dir)["refused"]}
        policy_sites = ["site-1"] if asked.startswith("noise") else sites  # only site-1 has a noise floor
        for site in sites:  # the others may still refuse, for their spent budget, but never for their policy
            assert (f"the run asks {asked}; this site's policy" in reasons.get(site, "")) == (site in policy_sites), \
                reasons
        for site in sites:
            if site in policy_sites:
                assert (d.state_dir(site) / "ledger.json").read_bytes() == saved[site], f"{site} charged a refused run"
            else:
                saved[site] = (d.state_dir(site) / "ledger.json").read_bytes()

    # Sites run only the app they approved. A checkout whose code skips DP has another digest: every site's
    # launcher refuses it before unpacking it, the coordinator records why, and nothing is charged.
    modified = tmp_path / "modified-checkout"
    shutil.copytree(REPO, modified, ignore=shutil.ignore_patterns(".git", ".venv", "demo-output", "__pycache__",
                                                                  "*.egg-info", ".pytest_cache"))
    site_py = modified / "fedvision" / "site.py"
    honest = "trainer = train_private if self.run.dp else train_nonprivate"
    assert honest in site_py.read_text()
    site_py.write_text(site_py.read_text().replace(honest, "trainer = train_nonprivate"))
    unapproved = tmp_path / "unapproved"
    proc = d.flwr_run(d.run_config(unapproved, **{"num-server-rounds": 1, "min-train-nodes": 3,
                                                  "min-available-nodes": 3}), name="unapproved", app=modified)
    _finish(d, proc, "unapproved")
    record = read_run(unapproved)
    failed = {r["site"]: r["reason"] for r in record["failed"]}
    assert set(failed) == set(sites), record["failed"]  # named by the names given at registration
    assert all("has not approved app sha256" in reason for reason in failed.values()), failed
    assert record["status"] == "failed" and not record["rounds"][0]["aggregated"]
    for site in sites:
        assert (d.state_dir(site) / "ledger.json").read_bytes() == saved[site], f"{site} charged an unapproved app"

    # No site's own path reached the coordinator: not in any run record, not in its logs.
    coordinator_sees = "".join((p.read_text() for p in tmp_path.glob("*/run.json"))) + \
        "".join(d.log(name) for name in ("superlink", "flwr-run", "unapproved", "refused-0", "refused-1", "refused-2"))
    for site in sites:
        assert str(d.data / site) not in coordinator_sees and str(d.state_dir(site)) not in coordinator_sees


def test_site_killed_mid_round_run_completes_and_site_rejoins_with_its_ledger(deploy, tmp_path):
    # Enough local work per round (≈50 DP steps) that the kill lands during training, after the charge.
    d = deploy(sites=3, per_site=240)
    sites = ["site-1", "site-2", "site-3"]
    _start_sites(d, sites)
    run_dir = tmp_path / "run"
    proc = d.flwr_run(d.run_config(run_dir, **{"num-server-rounds": 4, "round-timeout": 45.0, "batch-size": 16,
                                               "local-epochs": 4}))
    # Round 2: SIGKILL site-3's machine (SuperNode and ClientApp) right after its ledger charged the round.
    wait_for(lambda: any(e.get("round") == 2 for e in d.ledger("site-3")), 300, "site-3 to start round 2",
             interval=0.05)
    before = d.ledger("site-3")
    d.kill_node("site-3")
    # The SuperLink frees the node identity when heartbeats stop (≤ 60 s); then the site restarts.
    wait_for(lambda: "offline" in d.node_status(), 120, "the SuperLink to see site-3 offline", interval=2)
    d.start_node("site-3")
    _finish(d, proc)

    record = _check_lineage_and_ledgers(d, run_dir, sites)
    assert record["status"] == "completed" and record["completed_rounds"] == 4
    round2 = record["rounds"][1]
    assert sorted(round2["accepted"]) == ["site-1", "site-2"] and round2["aggregated"]
    assert any(f["site"] == "site-3" and f["round"] == 2 and "no reply" in f["reason"] for f in record["failed"])
    assert "site-3" in record["rounds"][-1]["accepted"], "the restarted site did not rejoin"
    after = d.ledger("site-3")
    assert after[:len(before)] == before, "the ledger lost or changed entries written before the kill"
    assert [e["round"] for e in after].count(2) == 1  # the killed round stays charged: its ε is not lost


def test_coordinator_killed_mid_run_and_resumed(deploy, tmp_path):
    d = deploy(sites=3)
    sites = ["site-1", "site-2", "site-3"]
    _start_sites(d, sites)
    run_dir = tmp_path / "run"
    settings = {"num-server-rounds": 3, "min-train-nodes": 3, "min-available-nodes": 3}
    proc = d.flwr_run(d.run_config(run_dir, **settings))
    # Round 2 has been sent: at least one site charged it. Kill the coordinator's machine now.
    wait_for(lambda: any(e.get("round") == 2 for s in sites for e in d.ledger(s)), 300, "round 2 to start",
             interval=0.1)
    d.kill_superlink()
    proc.wait(timeout=60)
    interrupted = read_run(run_dir)
    assert interrupted["status"] == "running" and interrupted["completed_rounds"] == 1

    d.start_superlink()  # same database, same port: the sites reconnect by themselves
    wait_for(lambda: d.node_status().count("online") == 3, 120, "the sites to reconnect", interval=2)
    proc = d.flwr_run(d.run_config(run_dir, **settings, resume=True), name="flwr-resume")
    _finish(d, proc, "flwr-resume")

    record = _check_lineage_and_ledgers(d, run_dir, sites)
    assert record["status"] == "completed" and record["completed_rounds"] == 3
    assert [r["from_round"] for r in record["resumes"]] == [1]
    for site in sites:  # every round charged exactly once, including the one interrupted mid-way
        assert sorted(e["round"] for e in d.ledger(site)) == [1, 2, 3]
    assert all(sorted(r["accepted"]) == sites for r in record["rounds"])


def test_deployed_sites_ignore_the_simulation_only_attack_hook(deploy, tmp_path):
    """`simulated-attacks` poisons simulated sites only (tests/test_federation_e2e.py covers the robust rules there):
    a coordinator's run config cannot make a deployed hospital send poisoned or altered updates."""
    d = deploy(sites=3)
    sites = ["site-1", "site-2", "site-3"]
    _start_sites(d, sites)
    run_dir = tmp_path / "run"
    proc = d.flwr_run(d.run_config(run_dir, **{
        "num-server-rounds": 2, "strategy": "fedmedian", "min-train-nodes": 2, "min-available-nodes": 3,
        "simulated-attacks": "site-3:nan/scale=100"}))
    _finish(d, proc)
    record = _check_lineage_and_ledgers(d, run_dir, sites)
    assert not [x for k in ("rejected", "failed", "refused") for x in record[k]]
    for r in record["rounds"]:
        assert sorted(r["accepted"]) == sites and r["aggregated"]
    final = load_model(run_dir / "global_model.pt")
    assert all(torch.isfinite(p).all() for p in final.state_dict().values())


def _outside_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP: picks the route, sends nothing
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.fixture
def nginx():
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        if os.environ.get("FEDVISION_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required here (FEDVISION_REQUIRE_NGINX=1) but not installed")
        pytest.skip("nginx is not installed (.ci/run installs it)")


def test_sites_reach_only_the_fleet_api_through_the_documented_proxy(deploy, tmp_path, nginx):
    """docs/deployment.md's nginx server block, used verbatim in front of a SuperLink bound to loopback: the sites
    train through it, and with what a site holds (ca.crt, the proxy's address) registering a key, listing runs
    or launching a run is refused."""
    d = deploy(sites=3)
    proxy = d.start_proxy()
    outside = _outside_address()
    if outside is not None:  # the SuperLink itself answers on loopback only
        with socket.socket() as s:
            assert s.connect_ex((outside, d.port)) != 0, f"the SuperLink answers on {outside}"

    attempts = {"register a key": ["supernode", "register", str(d.certs / "site-3.pub"), FEDERATION],
                "list nodes": ["supernode", "list", FEDERATION],
                "list runs": ["ls", FEDERATION],
                "launch a run": ["run", str(REPO), FEDERATION, "--run-config", str(d.run_config(tmp_path / "rogue"))]}
    for what, args in attempts.items():
        result = d.site_cli(proxy, *args)
        assert result.returncode != 0 and "403 Forbidden" in result.stdout + result.stderr, \
            f"a site could {what}: {result.stdout[-1500:]}{result.stderr[-1500:]}"
    assert not (tmp_path / "rogue" / "run.json").exists()

    sites = ["site-1", "site-2"]
    for site in sites:
        d.register(site)  # the coordinator's operators, on the coordinator itself
        d.start_node(site, superlink=proxy)
    wait_for(lambda: d.node_status().count("online") == 2, 90, "2 SuperNodes online through the proxy")
    assert len(d.node_status()) == 2, "a key registered through the proxy"
    run_dir = tmp_path / "run"
    # A model whose arrays exceed nginx's default body limit (1 MB): updates must pass the proxy whole.
    _finish(d, d.flwr_run(d.run_config(run_dir, **{"num-server-rounds": 1, "model": "resnet10t"})))
    record = _check_lineage_and_ledgers(d, run_dir, sites)
    assert record["status"] == "completed" and sorted(record["rounds"][0]["accepted"]) == sites

    # The sites' traffic went through the proxy, and every Control call there was refused.
    requests = [line.split('"')[1].split()[1:2] + [line.split('"')[2].split()[0]] for line in
                d.proxy_log().splitlines()]
    assert any(path.startswith("/v1/fleet/pull-messages") and status == "200" for path, status in requests)
    assert any(path.startswith("/v1/fleet/push-messages") and status == "200" for path, status in requests)
    control = [(path, status) for path, status in requests if not path.startswith("/v1/fleet/")]
    assert control and all(status == "403" for _, status in control), control
