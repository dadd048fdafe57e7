"""The compliance report: report.json against its schema, report.html self-contained and rendered by a browser.

The end-to-end tests audit a real small run: three simulated DP sites of synthetic-derm (16×16) train one round
through fedvision's own site and coordinator code (``fedvision.site.Site``, ``fedvision.federation.Coordinator``,
an example-weighted mean as FedAvg's aggregation), which writes run.json and global_model.pt exactly as a
Flower run does, without starting Flower. ``fedvision audit`` then runs on it with small settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from audit.intervals import wilson_interval
from audit.report import (
    REPORT_SCHEMA,
    build_report,
    render_html,
    validate_report,
)
from fedvision.cli import main

CHROMIUM = shutil.which("chromium")
SITES = 3
# Small settings: the audit of the run below takes about 15 s on 2 cores.
CHEAP = ["--limit", "12", "--n0", "10", "--n", "50", "--attacks", "fgsm", "pgd", "--eps", "linf:0,8/255",
         "--smooth-limit", "2", "--n-boot", "50", "--mia-samples", "100", "--no-progress"]


# --------------------------------------------------------------------------------------------------------
# a real run and its audit
# --------------------------------------------------------------------------------------------------------
def _train_run(run_dir: Path) -> Path:
    """One round of 3 DP sites through fedvision's site and coordinator code; returns the run folder."""
    from fedvision.config import NodeConfig, RunConfig
    from fedvision.federation import Coordinator
    from fedvision.messages import EvaluateReply, TrainReply
    from fedvision.federation_cli import SIMULATION_FILE
    from fedvision.io import atomic_write_json
    from fedvision.site import Site

    run = RunConfig.from_mapping({
        "run-dir": str(run_dir), "num-server-rounds": 1, "local-epochs": 1, "dataset": "synthetic-derm:0",
        "test-dataset": "synthetic-derm:0", "partitioning": "by:site", "image-size": 16, "batch-size": 64,
        "lr": 1.0, "momentum": 0.9, "max-grad-norm": 0.25, "noise-std": 0.25, "min-train-nodes": SITES,
        "min-available-nodes": SITES})
    coordinator = Coordinator(run)
    state, _ = coordinator.start()
    coordinator.record["initial_central"] = coordinator.central_evaluate(state)
    sites = [Site.from_configs(run, NodeConfig.from_mapping({"partition-id": i, "num-partitions": SITES}))
             for i in range(SITES)]
    started = time.perf_counter()
    replies = []
    for site in sites:
        weights, metrics = site.train(state, 1)
        replies.append(TrainReply(site=site.name, arrays={k: v.numpy() for k, v in weights.items()}, metrics=metrics))
    accepted = coordinator.screen(1, replies, state)
    counts = np.array([replies[i].metrics["num-examples"] for i in accepted], dtype=float)
    state = {k: torch.from_numpy(sum(c * replies[i].arrays[k].astype(np.float64) for c, i in zip(counts, accepted))
                                 / counts.sum()).to(v.dtype) for k, v in state.items()}
    evaluations = []
    for site in sites:
        local = site.evaluate(state)
        evaluations.append(EvaluateReply(site=site.name, groups=local.pop("groups"), classes=local.pop("classes"),
                                         metrics=local))
    coordinator.finish_round(1, replies, accepted, True, evaluations, coordinator.central_evaluate(state),
                             time.perf_counter() - started)
    coordinator.checkpoint(state, {})
    coordinator.write_record(status="completed")
    atomic_write_json(run_dir / SIMULATION_FILE, {"sites": SITES})  # as `fedvision run` marks a simulation
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def audited(run_dir, tmp_path_factory):
    """(output folder, stdout) of the full audit of the run's global model on the synthetic test split."""
    out = tmp_path_factory.mktemp("report") / "audit"
    code = main(["audit", "--model", str(run_dir / "global_model.pt"), "--data", "synthetic-derm:0",
                 "--run", str(run_dir), "--out", str(out), *CHEAP])
    assert code == 0
    return out


# --------------------------------------------------------------------------------------------------------
# report.json
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_of_a_real_audit_validates_and_matches_its_sources(audited, run_dir):
    from fedvision.data import load_dataset

    report = json.loads((audited / "report.json").read_text())
    validate_report(report)
    assert {"robustness.json", "certification.csv", "attacks.csv", "report.json", "report.html"} <= \
        {p.name for p in audited.iterdir()}
    assert not [p for p in audited.iterdir() if p.name.startswith(".")]  # no temporary files left

    model_file = run_dir / "global_model.pt"
    assert report["model"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert report["model"]["classes"] == ["benign", "malignant"] and report["model"]["img_size"] == 16

    # performance and fairness use every test sample; robustness the --limit subset
    test = load_dataset("synthetic-derm:0", image_size=16, split="test")
    performance = report["performance"]
    assert performance["n"] == len(test) == report["provenance"]["data"]["num_samples"]
    assert performance["ci"][0] <= performance["accuracy"] <= performance["ci"][1]
    assert sum(c["count"] for c in performance["per_class"].values()) == len(test)
    fairness = report["fairness"]
    assert fairness["sensitive"] == ["sex", "age_band", "skin_tone", "site"]  # the run config's, in its order
    assert all(t["overall"]["count"] == len(test) for t in fairness["attributes"].values())
    assert fairness["attributes"]["sex"]["overall"]["metrics"]["accuracy"]["value"] == \
        pytest.approx(performance["accuracy"])
    robustness = report["robustness"]
    assert robustness["num_samples"] == 12 and set(robustness["certification"]["certified_accuracy"]) == \
        {"0", "0.25", "0.5"}
    # n = 50 cannot certify r = 0.5: the page labels that radius, and does not claim the curve stopped short of
    # what n could certify (the quick demo's e2e test checks the other case)
    assert robustness["certification"]["max_certifiable_radius"] < 0.5
    assert "larger radii were not measured" not in (audited / "report.html").read_text()

    # the federated sections come from run.json
    record = json.loads((run_dir / "run.json").read_text())
    last = record["rounds"][-1]
    assert fairness["federated"]["round"] == last["round"]
    # The sites released their counts with DP noise: the federated total is the exact one within that noise
    # (2 sexes × 4 cells, each with count_noise_std), and its intervals say so.
    federated_sex = fairness["federated"]["attributes"]["sex"]
    noise = last["evaluate"]["count_noise_std"] * math.sqrt(2 * 4)
    assert noise > 0 and abs(federated_sex["overall"]["count"] - last["evaluate"]["num_examples"]) <= 5 * noise
    assert "DP" in federated_sex["params"]["method"]
    assert [r["round"] for r in performance["federated"]["rounds"]] == [0, 1]
    privacy = report["privacy"]
    assert privacy["assessed"] and {s["site"] for s in privacy["sites"]} == set(record["sites"])
    assert privacy["epsilon_max"] == max(s["epsilon"] for s in record["sites"].values())
    attack = privacy["membership_inference"]
    assert attack["n_members"] == attack["n_non_members"] == 100  # --mia-samples caps both (each site has more)
    assert report["provenance"]["run"]["sites"].keys() == record["sites"].keys()
    assert report["provenance"]["run"]["config"] == record["config"]
    assert report["provenance"]["data"]["sha256"] == test.summary["sha256"]

    checks = [f["check"] for f in report["findings"]]
    assert checks[:8] == ["provenance", "performance", "privacy: accounting", "privacy: noise independence",
                          "privacy: membership inference", "privacy: canary audit", "robustness: certified",
                          "robustness: attacks"]
    # the audited weights are the run's final global weights, by the lineage hash run.json records
    assert report["findings"][0]["status"] == "pass"
    assert report["model"]["weights_sha256"] == record["rounds"][-1]["global_sha256"]
    assert "fairness: federated (site-computed)" in checks
    # everything ran except the canary audit, which needs a simulation that planted canaries
    assert [f["check"] for f in report["findings"] if f["status"] == "not assessed"] == ["privacy: canary audit"]


@pytest.mark.slow
def test_without_run_privacy_is_not_assessed_and_never_passes(run_dir, tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", "--model", str(run_dir / "global_model.pt"), "--data", "synthetic-derm:0",
                 "--checks", "fairness", "privacy", "--out", str(out), "--n-boot", "20", "--sensitive", "sex,site"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "report.html" in printed and "[not assessed] privacy: accounting" in printed
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["privacy"] == {"assessed": False, "reason": "not assessed: no --run given"}
    assert report["robustness"]["assessed"] is False
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    assert statuses["privacy: accounting"] == statuses["privacy: membership inference"] == "not assessed"
    assert report["fairness"]["sensitive"] == ["sex", "site"] and report["fairness"]["federated"] is None
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]


@pytest.mark.slow
def test_bad_flags_stop_with_one_line_and_write_nothing(run_dir, tmp_path, capsys):
    base = ["audit", "--model", str(run_dir / "global_model.pt"), "--data", "synthetic-derm:0",
            "--out", str(tmp_path / "o"), "--checks", "fairness"]
    for extra in (["--sensitive", "sex,shoe_size"], ["--sensitive", ","], ["--run", str(tmp_path / "nowhere")],
                  ["--run", str(tmp_path)], ["--confidence", "1.5"], ["--mia-samples", "1", "--checks", "privacy"],
                  ["--n-boot", "-1"], ["--min-group-size", "0"]):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("fedvision: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------
# schema and building blocks (no training)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    """A report built from a tiny untrained model's predictions on hand-made data, fairness only."""
    from audit.fairness import assess_fairness
    from audit.report import AuditInputs
    from fedvision.models import create_model, save_model

    folder = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8, dp=False)
    path = save_model(model, folder / "model.pt", {"class_names": ["no", "yes"]})
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    attributes = pd.DataFrame({"sex": rng.choice(["F", "M"], 200), "site": rng.choice(["a", "b", "c"], 200)})
    inputs = AuditInputs(spec="npz:data.npz", split="test", dataset=None, classes=["no", "yes"],
                         attributes=attributes, data_summary={}, y_true=y_true, y_pred=y_pred)
    params = {"min_group_size": 30, "n_boot": 20, "confidence": 0.95, "seed": 0}
    fairness = {"sensitive": ["sex", "site"], "federated": None, "params": params,
                "attributes": assess_fairness(y_true, y_pred, attributes, labels=[0, 1], class_names=["no", "yes"],
                                              **params)}
    return build_report(path, model.fedvision_meta | {"class_names": ["no", "yes"]}, inputs,
                        {"fairness": fairness, "privacy": {"assessed": False, "reason": "not assessed: no --run given"}})


def test_schema_rejects_a_report_missing_a_required_key(small_report):
    validate_report(small_report)
    for key in REPORT_SCHEMA["required"]:
        broken = copy.deepcopy(small_report)
        del broken[key]
        with pytest.raises(ValueError, match=key):
            validate_report(broken)
    broken = copy.deepcopy(small_report)
    broken["findings"][0]["status"] = "probably fine"
    with pytest.raises(ValueError, match="findings/0/status"):
        validate_report(broken)
    broken = copy.deepcopy(small_report)
    broken["robustness"] = {"assessed": True}  # claims an assessment without its numbers
    with pytest.raises(ValueError, match="robustness"):
        validate_report(broken)


def test_provenance_flags_a_model_that_is_not_the_runs_result(small_report, tmp_path):
    from audit.findings import lineage_finding
    from audit.report import AuditInputs

    rounds = [{"round": 1, "global_sha256": "a" * 64}, {"round": 2, "global_sha256": "b" * 64}]
    def finding(weights):
        return lineage_finding(AuditInputs(spec="x", split="test", dataset=None, classes=["no", "yes"],
                                            attributes=pd.DataFrame(), data_summary={}, y_true=np.zeros(1, int),
                                            y_pred=np.zeros(1, int), run_record={"rounds": rounds},
                                            weights_sha256=weights))
    assert finding("b" * 64)["status"] == "pass"
    assert finding("a" * 64)["status"] == "flag" and "round 1" in finding("a" * 64)["reason"]
    assert finding("c" * 64)["status"] == "flag" and "not a model this run produced" in finding("c" * 64)["reason"]
    assert {f["check"]: f["status"] for f in small_report["findings"]}["provenance"] == "not assessed"


def test_a_check_that_did_not_run_is_never_a_pass(small_report):
    statuses = {f["check"]: f["status"] for f in small_report["findings"]}
    assert statuses["robustness: certified"] == statuses["robustness: attacks"] == "not assessed"
    assert statuses["privacy: accounting"] == "not assessed"
    assert small_report["robustness"] == {"assessed": False, "reason": "not requested (--checks)"}


def test_html_is_self_contained_and_escapes_every_string_from_data(small_report):
    page = render_html(small_report)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may spell anything
    assert not re.search(r"https?:|//[a-z]|<script|<link|@import|url\(", text, re.IGNORECASE)
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert references and all(r.startswith(("data:image/png;base64,", "#")) for r in references), references

    hostile = copy.deepcopy(small_report)
    payload = '<script>alert("x")</script><img src="https://example.com/t.png">'
    hostile["findings"][0]["reason"] = payload
    groups = hostile["fairness"]["attributes"]["sex"]["groups"]
    groups[payload] = groups.pop("F")
    page = render_html(hostile)
    assert "<script" not in page and 'src="https://' not in page
    assert page.count(html_escaped(payload)) >= 2  # the finding and the group's table row (the figure is pixels)


def html_escaped(text: str) -> str:
    from markupsafe import escape  # what the templates' autoescaping writes

    return str(escape(text))


def test_status_order_lists_the_statuses_the_schema_allows():
    from audit.findings import STATUS_ORDER

    status = REPORT_SCHEMA["properties"]["findings"]["items"]["properties"]["status"]["enum"]
    assert set(STATUS_ORDER) == set(status)


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n, confidence in ((0, 10, 0.95), (7, 10, 0.9), (482, 600, 0.95), (600, 600, 0.99)):
        expected = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        assert wilson_interval(k, n, confidence) == pytest.approx([expected.low, expected.high], abs=1e-12)
    assert wilson_interval(0, 0, 0.95) is None


def test_numeric_age_is_audited_in_bands_at_sites_and_in_the_audit_alike():
    from audit.cli import _sensitive_attributes
    from audit.fairness import assess_fairness
    from fedvision.groups import group_labels

    table = pd.DataFrame({"age": [12, 39.9, 40, 60, 60.5, None], "sex": list("FMFMFM")})
    out = _sensitive_attributes(table, None, None, "manifest:m.csv")
    assert list(out.columns) == ["sex", "age"]  # KNOWN_SENSITIVE order
    labels = group_labels(out)  # what assess_fairness and Site.evaluate both group by
    assert labels["age"].tolist() == ["<40", "<40", "40-60", "40-60", ">60", "unknown"]
    assert labels["sex×age"][0] == "F×<40"
    y = np.zeros(6, int)
    assert list(assess_fairness(y, y, out, labels=[0, 1], min_group_size=1, n_boot=0)["age"]["groups"]) == [
        "<40", "40-60", ">60", "unknown"]


# --------------------------------------------------------------------------------------------------------
# the page in a real browser
# --------------------------------------------------------------------------------------------------------
# Appended to a copy of the page (the report itself has no script): after load, every image must have
# decoded and nothing may have been fetched; the verdict is written into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(img => !img.complete || img.naturalWidth === 0);
  broken.forEach(img => console.error("image did not decode: " + img.alt));
  const fetched = performance.getEntriesByType("resource").map(r => r.name);
  fetched.forEach(name => console.error("fetched " + name));
  const verdict = document.createElement("pre");
  verdict.id = "probe";
  verdict.textContent = `images=${images.length} broken=${broken.length} fetched=${fetched.length}`;
  document.body.appendChild(verdict);
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium_without_console_errors(audited, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("FEDVISION_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (FEDVISION_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("chromium is not installed")
    page = (audited / "report.html").read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    verdict = re.search(r'<pre id="probe">([^<]*)</pre>', dom.stdout)
    assert verdict, dom.stderr[-2000:]
    assert verdict.group(1) == f"images={page.count('<img ')} broken=0 fetched=0"
    assert page.count("<img ") >= 8  # rounds, ROC, certified curve, attacks, one per attribute at least
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console

    shot = tmp_path / "report.png"
    _chromium("--window-size=1200,2400", f"--screenshot={shot}", (audited / "report.html").as_uri(),
              profile=tmp_path / "profile")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20  # text, tables and figures, not a blank page
