"""Privacy audit: the accounting read from run.json, Clopper–Pearson bounds that hold, and a membership inference
ε lower bound that stays under a DP model's claim and exposes an overfit non-private model."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom

from audit.intervals import clopper_pearson_upper
from audit.privacy import (
    membership_inference,
    membership_inference_from_scores,
    privacy_from_run,
    run_privacy_audit,
)
from fedvision.config import RunConfig
from fedvision.errors import DataError
from fedvision.models import create_model
from fedvision.privacy import PrivacyLedger
from fedvision.train import TrainConfig, train_nonprivate, train_private

DELTA = 1e-5


def write_run(run_dir, sites, **config):
    """A run folder as the Coordinator writes it (same keys), with only what the privacy audit reads filled in."""
    record = {"format": "fedvision-run/1", "config": RunConfig.from_mapping(config).to_mapping(), "sites": sites,
              "rounds": [], "status": "completed", "completed_rounds": 3}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def site_entry(epsilon, budget=8.0, delta=DELTA):
    return {"num_examples": 480, "epsilon": epsilon, "delta": delta, "epsilon_budget": budget,
            "noise_multiplier": 1.3, "sample_rate": 0.13, "steps": 120, "accountant": "rdp", "last_round": 3}


def test_accounting_reports_every_site_and_the_largest_epsilon(tmp_path):
    sites = {"site-1": site_entry(3.2), "site-2": site_entry(7.9), "site-3": site_entry(9.1, budget=8.0),
             "site-4": {"num_examples": 200}}  # a site that never trained: no ε to report
    result = privacy_from_run(write_run(tmp_path / "run", sites))
    assert result["epsilon_max"] == max(s["epsilon"] for s in sites.values() if "epsilon" in s)
    assert result["delta"] == DELTA and result["dp"] and result["accountant"] == "rdp"
    assert [s["site"] for s in result["sites"]] == sorted(sites)
    by_site = {s["site"]: s for s in result["sites"]}
    assert by_site["site-2"]["noise_multiplier"] == 1.3 and by_site["site-2"]["steps"] == 120
    assert by_site["site-4"]["epsilon"] is None and by_site["site-4"]["accountant"] == "none"
    assert by_site["site-3"]["within_budget"] is False and by_site["site-1"]["within_budget"] is True
    assert result["source"] == str(tmp_path / "run" / "run.json") and "δ=1e-05" in result["method"]


@pytest.mark.parametrize("content", ["{not json", '{"format": "something-else/1"}', None])
def test_unreadable_run_record_is_a_one_line_error_naming_the_file(tmp_path, content):
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    with pytest.raises(DataError) as info:
        privacy_from_run(tmp_path)
    assert str(tmp_path / "run.json") in str(info.value) and "\n" not in str(info.value)


def test_clopper_pearson_upper_bound_covers_the_true_rate():
    confidence, n = 0.95, 40
    assert clopper_pearson_upper(0, n, confidence) == pytest.approx(1 - (1 - confidence) ** (1 / n))
    assert clopper_pearson_upper(n, n, confidence) == 1.0
    # Exact coverage P(bound ≥ p) over every outcome k ~ Binomial(n, p), on a grid of true rates.
    outcomes = np.arange(n + 1)
    bounds = clopper_pearson_upper(outcomes, n, confidence)
    coverage = [binom.pmf(outcomes, n, p)[bounds >= p].sum() for p in np.linspace(0.01, 0.99, 99)]
    assert min(coverage) >= confidence - 1e-12  # valid at every rate ...
    assert min(coverage) < confidence + 0.01  # ... and tight somewhere, not vacuous


def test_epsilon_bound_on_scores_with_known_rates():
    delta, confidence = DELTA, 0.95
    # Perfectly separated: every member scores 1, every non-member 0; each evaluation half has 100 samples.
    separated = membership_inference_from_scores(np.ones(200), np.zeros(200), claimed_epsilon=8.0, delta=delta)
    upper = 1 - (1 - confidence) ** (1 / 100)  # Clopper–Pearson bound for 0 errors in 100
    assert separated["tpr"] == 1.0 and separated["fpr"] == 0.0 and separated["auc"] == 1.0
    assert separated["epsilon_lower_bound"] == pytest.approx(np.log((1 - delta - upper) / upper))
    assert not separated["red_flag"]  # ≈ 3.49 < 8: 200 samples cannot certify more
    # Every member scores 1 and 60 of 200 non-members do too: TPR 1, FPR 0.3 in expectation.
    non_members = np.r_[np.ones(60), np.zeros(140)]
    mixed = membership_inference_from_scores(np.ones(200), non_members, delta=delta, seed=1)
    counts = mixed["evaluation_half"]
    fpr_upper = beta.ppf(confidence, counts["false_positives"] + 1, counts["non_members"] - counts["false_positives"])
    fnr_upper = 1 - (1 - confidence) ** (1 / counts["members"])
    assert mixed["tpr"] == 1.0 and mixed["fpr"] == pytest.approx(0.3, abs=0.1)
    assert mixed["epsilon_lower_bound"] == pytest.approx(max(np.log((1 - delta - fnr_upper) / fpr_upper),
                                                             np.log((1 - delta - fpr_upper) / fnr_upper)))
    # The same scores for both: no evidence of leakage.
    same = membership_inference_from_scores(np.zeros(200), np.zeros(200), claimed_epsilon=1.0)
    assert same["epsilon_lower_bound"] == 0.0 and same["auc"] == 0.5 and not same["red_flag"]
    assert len(separated["roc"]["fpr"]) == len(separated["roc"]["tpr"]) <= 101


def test_membership_inference_stays_below_a_dp_models_claim(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    model = create_model("fedvision_cnn", 10, in_chans=1, img_size=8)
    result = train_private(model, train, TrainConfig(epochs=8, batch_size=128, lr=1.0, momentum=0.9,
                                                     max_grad_norm=0.25, epsilon_budget=2.0, delta=DELTA, seed=0,
                                                     device="cpu"), PrivacyLedger(tmp_path / "ledger.json"))
    members = torch.utils.data.Subset(train, range(len(test)))
    audit = membership_inference(model, members, test, claimed_epsilon=result.epsilon, delta=DELTA, device="cpu")
    assert 0 < result.epsilon <= 2.0
    assert audit["epsilon_lower_bound"] < result.epsilon and not audit["red_flag"]
    assert audit["n_members"] == audit["n_non_members"] == len(test)


def test_membership_inference_exposes_an_overfit_nonprivate_model(digits):
    train, _ = digits
    images, _ = train.tensors
    # Random labels can only be learned by memorising: members get near-zero loss, non-members do not.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (len(images),), generator=g)
    members = torch.utils.data.TensorDataset(images[:200], labels[:200])
    non_members = torch.utils.data.TensorDataset(images[200:400], labels[200:400])
    torch.manual_seed(0)
    model = create_model("fedvision_cnn", 10, in_chans=1, img_size=8, dp=False)
    train_nonprivate(model, members, TrainConfig(epochs=150, batch_size=25, lr=0.05, momentum=0.9, seed=0,
                                                 device="cpu"))
    audit = membership_inference(model, members, non_members, claimed_epsilon=1.0, device="cpu")
    assert audit["auc"] > 0.95
    assert audit["epsilon_lower_bound"] > 2.0
    assert audit["red_flag"] and "exceeds the claimed" in audit["reason"]


def test_run_audit_rebuilds_the_sites_members_in_a_simulation_and_skips_elsewhere(tmp_path):
    from fedvision.config import NodeConfig
    from fedvision.site import site_data

    config = {"dataset": "digits", "partitioning": "iid", "image-size": 8, "channels": 1}
    model = create_model("fedvision_cnn", 10, in_chans=1, img_size=8)
    deployed = write_run(tmp_path / "deployed", {"site-1": site_entry(4.0)}, **config)
    skipped = run_privacy_audit(model, deployed)
    assert skipped["membership_inference"] is None and "not a simulation" in skipped["skipped"]
    assert skipped["accounting"]["epsilon_max"] == 4.0

    simulated = write_run(tmp_path / "simulated", {"site-1": site_entry(4.0), "site-2": site_entry(6.0)}, **config)
    (simulated / "simulation.json").write_text(json.dumps({"sites": 3}))
    result = run_privacy_audit(model, simulated, max_samples=10_000)
    audit = result["membership_inference"]
    train, local_test = site_data(RunConfig.from_mapping(config),
                                  NodeConfig.from_mapping({"partition-id": 1, "num-partitions": 3}))
    assert audit["site"] == "site-2" and audit["claimed_epsilon"] == 6.0  # the largest ε is audited by default
    assert (audit["n_members"], audit["n_non_members"]) == (len(train), len(local_test))
    capped = run_privacy_audit(model, simulated, site="site-1", max_samples=50)["membership_inference"]
    assert capped["n_members"] == capped["n_non_members"] == 50 and capped["claimed_epsilon"] == 4.0
