"""End to end through real `flwr run` simulations (Flower's own engine, real Opacus, real files)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit.mechanism import noise_independence
from audit.report import validate_report
from fedvision.privacy import PrivacyLedger

pytestmark = pytest.mark.slow

# Digits (real 8×8 images) keep each simulated round to a few seconds on 2 cores.
DIGITS = ["--set", "dataset='digits'", "--set", "partitioning='iid'", "--set", "image-size=8", "--set", "channels=1",
          "--set", "test-dataset='digits'", "--set", "batch-size=64", "--set", "lr=1.0", "--set", "momentum=0.9",
          "--set", "max-grad-norm=0.25"]


def fedvision(*args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "fedvision.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedvision {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    """3 sites × 3 rounds, uninterrupted: the reference run."""
    out = tmp_path_factory.mktemp("fed") / "three-sites"
    fedvision("run", "--sites", "3", "--rounds", "3", "--out", str(out), *DIGITS)
    return out


def test_three_sites_three_rounds_improve_and_report_each_ledger(three_sites):
    rec = record(three_sites)
    assert rec["status"] == "completed" and rec["completed_rounds"] == 3
    assert [r["round"] for r in rec["rounds"]] == [1, 2, 3]
    assert rec["rounds"][-1]["central"]["accuracy"] > rec["initial_central"]["accuracy"] + 0.2
    assert sorted(rec["sites"]) == ["site-1", "site-2", "site-3"]
    for name, site in rec["sites"].items():
        ledger = PrivacyLedger(three_sites / "sites" / name / "ledger.json")
        assert site["epsilon"] == pytest.approx(ledger.epsilon(site["delta"]), rel=1e-9)
        assert 0 < site["epsilon"] <= 8.0 and len(ledger.entries_of("training")) == 3
        # Local evaluation: its own record set, one noisy release per round, within the run's allotment.
        assert len(ledger.entries_of("evaluation")) == 3
        assert site["epsilon_evaluation"] == pytest.approx(ledger.epsilon(site["delta"], "evaluation"), rel=1e-9)
        assert 0 < site["epsilon_evaluation"] <= 1.0 and site["secret_randomness"] is True
    assert {"fedvision", "flwr", "torch", "opacus"} <= set(rec["versions"])
    timing = rec["rounds"][0]["timing"]
    assert timing["round_seconds"] >= timing["site_training_seconds"] > 0
    # The saved global model loads with one call and knows its classes.
    from fedvision.models import load_model

    model = load_model(three_sites / "global_model.pt")
    assert model.fedvision_meta["class_names"] == [str(i) for i in range(10)]
    # Federated per-group confusion counts cover every local test example.
    evaluation = rec["rounds"][-1]["evaluate"]
    assert evaluation["num_examples"] > 0


def test_killed_coordinator_resumes_without_losing_or_double_counting_privacy(three_sites, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedvision.cli", "run", "--sites", "3", "--rounds", "3",
                             "--out", str(out), *DIGITS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            try:
                if record(out)["completed_rounds"] >= 2:
                    break
            except (OSError, json.JSONDecodeError, KeyError):
                pass
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.2)
        else:
            pytest.fail("round 2 never completed")
    finally:
        # The coordinator's machine dies: the CLI and flwr, and the local SuperLink that Flower detached into its
        # own session, with the simulation it runs.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_flower_processes()
    assert record(out)["status"] == "running"

    fedvision("run", "--resume", str(out))
    rec, ref = record(out), record(three_sites)
    assert rec["status"] == "completed" and [r["round"] for r in rec["rounds"]] == [1, 2, 3]
    assert len(rec["resumes"]) == 1 and rec["resumes"][0]["from_round"] >= 2
    for name in ("site-1", "site-2", "site-3"):
        # Same ε as the uninterrupted run: no spend forgotten, none counted twice.
        assert rec["sites"][name]["epsilon"] == pytest.approx(ref["sites"][name]["epsilon"], rel=1e-9)
        assert len(PrivacyLedger(out / "sites" / name / "ledger.json").entries_of("training")) == 3


def _kill_flower_processes() -> None:
    names = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "flwr-clientapp")
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")[:2] if entry.name.isdigit() else []
        except OSError:
            continue
        if any(a.decode(errors="replace").endswith(names) for a in args):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sites_add_independent_noise(three_sites, tmp_path):
    """Every site's update is mostly its own DP noise (ε = 8 on ~360 digits per site). Were the noise shared or
    reproducible (as when it was seeded from the run config), two sites' updates would point the same way
    (cosine ≈ 1); independent noise leaves them nearly orthogonal, and the audit's check passes."""
    for r in record(three_sites)["rounds"]:
        assert len(r["updates"]["pairs"]) == 3
        assert all(abs(pair["cosine"]) < 0.2 for pair in r["updates"]["pairs"].values()), r["updates"]["pairs"]
    assert noise_independence(record(three_sites))["passed"]

    # The audit's test hook: every simulated site seeds its noise with one public value. The audit catches it
    # from what the coordinator saw, and the run record says the randomness was not secret.
    shared = tmp_path / "shared"
    fedvision("run", "--sites", "3", "--rounds", "1", "--out", str(shared), *DIGITS, "--set", "noise-multiplier=30.0",
              "--set", "local-test-fraction=0.0", "--set", "max-update-norm=0.0", "--set", "insecure-shared-dp-seed=7")
    pairs = record(shared)["rounds"][0]["updates"]["pairs"]
    assert all(pair["cosine"] > 0.9 for pair in pairs.values()), pairs  # the same noise everywhere
    check = noise_independence(record(shared))
    assert check["assessed"] and not check["passed"] and len(check["flagged"]) == 3
    assert all(site["secret_randomness"] is False for site in record(shared)["sites"].values())


def test_site_with_too_small_budget_is_refused_and_the_run_goes_on(tmp_path):
    out = tmp_path / "budget"
    fedvision("run", "--sites", "3", "--rounds", "2", "--out", str(out), *DIGITS,
              "--set", "site-epsilon-budgets='0.05,8,8'")
    rec = record(out)
    assert rec["status"] == "completed"
    assert {r["site"] for r in rec["refused"]} == {"site-1"} and len(rec["refused"]) == 2
    assert "too small" in rec["refused"][0]["reason"]
    assert all(sorted(r["accepted"]) == ["site-2", "site-3"] for r in rec["rounds"])  # replies arrive in any order
    assert PrivacyLedger(out / "sites" / "site-1" / "ledger.json").entries == []


def test_poisoned_sites_are_rejected_and_accuracy_holds(tmp_path):
    clean, attacked = tmp_path / "clean", tmp_path / "attacked"
    # A loose budget (DP still on) so both runs converge and the comparison measures the aggregation, not
    # how much DP noise two honest sites average away compared with four.
    common = ["--sites", "4", "--rounds", "3", *DIGITS, "--set", "local-epochs=5", "--set", "batch-size=128",
              "--set", "local-test-fraction=0.0", "--set", "epsilon-budget=50.0"]
    fedvision("run", "--out", str(clean), *common)
    # Weights: NaN (site-2), ×100 (site-3). Replies: an extra metric key (site-3, round 2), a claim of 10⁹
    # examples (site-4, rounds 1 and 3) and evaluation tables of the wrong shape (site-4, round 2).
    fedvision("run", "--out", str(attacked), *common, "--set", "simulated-attacks='site-2:nan,"
              "site-3:scale=100/extra/scale=100,site-4:claim=1000000000/badeval/claim=1000000000'")
    rec = record(attacked)
    assert rec["status"] == "completed" and all(r["aggregated"] for r in rec["rounds"])
    reasons = {(r["site"], r["round"]): r["reason"] for r in rec["rejected"]}
    assert set(reasons) == {(s, r) for s in ("site-2", "site-3") for r in (1, 2, 3)} | {("site-4", 2)}
    assert "NaN" in reasons["site-2", 1] and "norm" in reasons["site-3", 1]
    assert "malformed reply" in reasons["site-3", 2] and "unexpected extra-key" in reasons["site-3", 2]
    assert reasons["site-4", 2].startswith("evaluate reply: malformed reply") and "table" in reasons["site-4", 2]
    assert {(s["site"], s["round"]) for s in rec["suspects"] if "claims 1000000000" in s["reason"]} == \
        {("site-4", 1), ("site-4", 3)}
    assert all(sorted(r["accepted"]) == ["site-1", "site-4"] for r in rec["rounds"])
    accuracy, clean_accuracy = rec["rounds"][-1]["central"]["accuracy"], record(clean)["rounds"][-1]["central"]["accuracy"]
    print(f"poisoning: clean {clean_accuracy:.3f}, attacked (NaN + ×100 rejected) {accuracy:.3f}")
    # Two honest sites average away less of their (independent) DP noise than four: a few points are expected.
    assert accuracy >= clean_accuracy - 0.08


def test_federated_dp_on_digits_learns_at_epsilon_8(tmp_path):
    """3 sites of 449 digits each at ε = 8, the DP recipe (ScatterNet features + linear head)."""
    out = tmp_path / "digits"
    fedvision("run", "--sites", "3", "--rounds", "4", "--out", str(out), *DIGITS, "--set", "batch-size=128",
              "--set", "local-epochs=5", "--set", "local-test-fraction=0.0", "--set", "epsilon-budget=8.0",
              "--set", "delta=1e-5", "--set", "model='fedvision_scatternet'", "--set", "lr=4.0")
    rec = record(out)
    accuracy = rec["rounds"][-1]["central"]["accuracy"]
    print(f"federated DP digits: accuracy {accuracy:.3f}, ε per site",
          {k: round(v["epsilon"], 3) for k, v in rec["sites"].items()})
    assert all(site["epsilon"] <= 8.0 for site in rec["sites"].values()) and len(rec["sites"]) == 3
    # Measured 0.907–0.949 in eleven in-process runs (benchmarks/dp_accuracy.py --recipe digits) and 0.929 through
    # flwr run; the margin covers fresh noise.
    assert accuracy >= 0.88


def test_quick_demo_trains_three_dp_sites_and_audits_the_global_model(tmp_path):
    proc = fedvision("demo", "--quick", "--out", str(tmp_path / "demo"))
    run_dir, report = tmp_path / "demo" / "run", tmp_path / "demo" / "report"
    rec = record(run_dir)
    assert rec["status"] == "completed" and sorted(rec["sites"]) == ["site-1", "site-2", "site-3"]
    assert all(0 < s["epsilon"] <= 8.0 for s in rec["sites"].values())
    robustness = json.loads((report / "robustness.json").read_text())
    assert robustness["certification"]["params"]["sigma"] == 0.25  # the σ the demo model was trained with
    full = json.loads((report / "report.json").read_text())
    validate_report(full)
    assert full["privacy"]["assessed"] and full["fairness"]["federated"] is not None
    # The quick demo learns: it beats always answering the majority class (0.530). Nine in-process runs scored
    # 0.59–0.70, each with its whole 95 % CI above 0.530 (README); with fresh noise the test asserts the point
    # estimate, which a model that learned nothing cannot pass, and leaves the interval to the benchmark.
    performance = full["performance"]
    assert performance["accuracy"] > performance["majority_class_rate"] + 0.02, performance
    assert str(report / "report.html") in proc.stdout and (report / "report.html").is_file()
    # The default curve stops at r = 0.5, below what n ≤ 10,000 can certify: the page says so
    certification = full["robustness"]["certification"]
    assert max(map(float, certification["certified_accuracy"])) < certification["max_certifiable_radius"]
    assert "larger radii were not measured" in (report / "report.html").read_text()
