"""The privacy part of the audit: what the sites' accountants claim, and an empirical check of the claim.

* ``privacy_from_run`` reads the (ε, δ) each site's ledger reported into ``run.json``: Opacus's RDP
  accountant, cumulative over every round the site trained.
* ``membership_inference`` attacks the model: the loss-threshold attack of Yeom et al. (2018) ("Privacy risk
  in machine learning", score = −cross-entropy loss; training members tend to have lower loss). Besides its AUC
  it turns the attack into an empirical lower bound on ε as Jagielski et al. (2020, "Auditing differentially
  private machine learning: how private is private SGD?") do: any (ε, δ)-DP mechanism forces every test to
  have FPR·e^ε + FNR ≥ 1 − δ (and with FPR and FNR swapped), so Clopper–Pearson upper bounds on the attack's
  FPR and FNR on fresh samples give ε ≥ max(log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺)). The
  threshold is chosen on one half of the samples and the bound computed on the other, so the choice does not
  inflate it. A lower bound above the claimed ε means the accounting (or its implementation) is wrong.
  A bound far below the claim is expected and proves nothing: one model and a few hundred samples give a
  weak attack (Jagielski et al. plant canaries and train many models to get tight bounds).
* ``run_privacy_audit`` does both for one site of a run (and, when the run planted canaries, the one-run canary
  audit of ``audit.canary``); the site's training members can be rebuilt only for
  simulations, where this machine holds the data.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audit.findings import contradicts_claim
from audit.intervals import clopper_pearson_upper
from fedvision.errors import ConfigError, DataError
from fedvision.federation import RUN_RECORD, read_run_record
from fedvision.federation_cli import SIMULATION_FILE

ROC_POINTS = 101  # the ROC curve is reported at most at this many of its points


# ---------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------
def privacy_from_run(run_dir: str | Path) -> dict[str, Any]:
    """Per-site (ε, δ) from ``RUN_DIR/run.json`` and the run's worst case.

    ``epsilon_max``/``delta`` are the largest ε and δ over the sites: every site's data is then
    (epsilon_max, delta)-DP with respect to the released model (an (ε_i, δ_i) guarantee implies any larger pair).
    """
    path = Path(run_dir) / RUN_RECORD
    record = read_run_record(path)
    config = record.get("config", {})
    sites = []
    for name in sorted(record.get("sites", {})):
        entry = record["sites"][name]
        epsilon = entry.get("epsilon")
        budget = entry.get("epsilon_budget")
        sites.append({
            "site": name, "epsilon": epsilon, "epsilon_rdp": entry.get("epsilon_rdp"), "delta": entry.get("delta"),
            "epsilon_budget": budget,
            "noise_multiplier": entry.get("noise_multiplier"), "sample_rate": entry.get("sample_rate"),
            "steps": entry.get("steps"), "num_examples": entry.get("num_examples"),
            "accountant": entry.get("accountant") if epsilon is not None else "none",
            "within_budget": (epsilon <= budget) if epsilon is not None and budget is not None else None,
            "last_round": entry.get("last_round"),
            # The local evaluation records are a separate record set with their own ε (parallel composition).
            "epsilon_evaluation": entry.get("epsilon_evaluation"),
            "evaluation_examples": entry.get("evaluation_examples"),
            "exact_evaluation": entry.get("exact_evaluation"),
            "secret_randomness": entry.get("secret_randomness"),
            "released": _releases(entry),
        })
    accounted = [s for s in sites if s["epsilon"] is not None]
    deltas = [s["delta"] for s in accounted if s["delta"] is not None]
    delta = max(deltas) if deltas else config.get("delta")
    accountants = sorted({s["accountant"] for s in accounted})
    accountant_name = "/".join(accountants) if accountants else "none"
    dp = bool(config.get("dp", True)) and bool(accounted)
    return {
        "epsilon_max": max((s["epsilon"] for s in accounted), default=None),
        "delta": delta,
        "accountant": accountant_name,
        "sites": sites,
        "dp": dp,
        "source": str(path),
        "completed_rounds": record.get("completed_rounds"),
        "method": (f"{_accountant_words(accountant_name)}, per-site cumulative over every release the site's ledger "
                   f"holds, training and local evaluation records accounted separately, δ={delta:g}"
                   if dp and delta is not None else
                   "no DP accounting: the run trained without differential privacy (no privacy guarantee)"),
    }


def _accountant_words(name: str) -> str:
    return {"rdp": "RDP accountant", "pld": "PLD accountant (dp-accounting)"}.get(name, f"{name} accountant")


def _releases(entry: dict[str, Any]) -> str:
    """What the site sent besides the DP-trained weights, in words (docs/privacy.md has the full list)."""
    if entry.get("exact_evaluation"):
        evaluation = "exact per-group evaluation counts (NOT private: the site chose exact release)"
    elif entry.get("epsilon_evaluation") is not None:
        evaluation = "per-group evaluation counts with Gaussian noise (ε above)"
    else:
        evaluation = "no evaluation counts"
    return f"{evaluation}; declared: record counts, training time, policy and accounting metadata"


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def epsilon_lower_bound(fpr_upper: Any, fnr_upper: Any, delta: float) -> np.ndarray:
    """max(0, log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺)): what (ε, δ)-DP would have to satisfy."""
    fpr_upper, fnr_upper = np.asarray(fpr_upper, dtype=float), np.asarray(fnr_upper, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log((1.0 - delta - fnr_upper) / fpr_upper)
        second = np.log((1.0 - delta - fpr_upper) / fnr_upper)
    # A non-positive numerator gives no bound (NaN from the log): the test says nothing in that direction.
    return np.fmax(0.0, np.fmax(np.nan_to_num(first, nan=0.0), np.nan_to_num(second, nan=0.0)))


# ---------------------------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------------------------
def membership_inference(model: torch.nn.Module, members: torch.utils.data.Dataset,
                         non_members: torch.utils.data.Dataset, *, claimed_epsilon: float | None = None,
                         delta: float = 1e-5, confidence: float = 0.95, seed: int = 0, batch_size: int = 256,
                         device: str | None = None) -> dict[str, Any]:
    """Loss-threshold membership inference on ``members`` (training samples) vs ``non_members`` (held out),
    both datasets of (image, label); see the module docstring for the ε lower bound."""
    member_loss = per_sample_loss(model, members, batch_size, device)
    non_member_loss = per_sample_loss(model, non_members, batch_size, device)
    result = membership_inference_from_scores(-member_loss, -non_member_loss, claimed_epsilon=claimed_epsilon,
                                              delta=delta, confidence=confidence, seed=seed)
    result["mean_loss"] = {"members": float(member_loss.mean()), "non_members": float(non_member_loss.mean())}
    return result


def per_sample_loss(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 256,
                    device: str | None = None) -> np.ndarray:
    """Cross-entropy loss of ``model`` (in eval mode) on each sample, in dataset order."""
    from fedvision.train import predict_logits

    logits, labels = predict_logits(model, dataset, batch_size, device)
    return torch.nn.functional.cross_entropy(logits.double(), labels.long(), reduction="none").numpy()


def membership_inference_from_scores(member_scores: Any, non_member_scores: Any, *,
                                     claimed_epsilon: float | None = None, delta: float = 1e-5,
                                     confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The attack on given scores (higher = more likely a member): AUC, ROC, threshold and ε lower bound."""
    from sklearn.metrics import roc_auc_score, roc_curve

    members = _scores(member_scores, "members")
    non_members = _scores(non_member_scores, "non_members")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta: must be in [0, 1), got {delta!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence: must be in (0, 1), got {confidence!r}")
    if claimed_epsilon is not None and not (claimed_epsilon >= 0 and math.isfinite(claimed_epsilon)):
        raise ConfigError(f"claimed_epsilon: must be a finite number ≥ 0 or None, got {claimed_epsilon!r}")

    is_member = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    scores = np.r_[members, non_members]
    roc_fpr, roc_tpr, _ = roc_curve(is_member, scores)
    keep = np.unique(np.round(np.linspace(0, len(roc_fpr) - 1, min(ROC_POINTS, len(roc_fpr)))).astype(int))

    rng = np.random.default_rng(seed)
    member_choose, member_eval = _halves(members, rng)
    non_member_choose, non_member_eval = _halves(non_members, rng)
    threshold = _best_threshold(member_choose, non_member_choose, delta, confidence)
    false_negatives = int(np.sum(member_eval < threshold))
    false_positives = int(np.sum(non_member_eval >= threshold))
    fnr_upper = float(clopper_pearson_upper(false_negatives, len(member_eval), confidence))
    fpr_upper = float(clopper_pearson_upper(false_positives, len(non_member_eval), confidence))
    bound = float(epsilon_lower_bound(fpr_upper, fnr_upper, delta))

    red_flag = contradicts_claim(bound, claimed_epsilon)
    if claimed_epsilon is None:
        reason = (f"no ε claimed (trained without DP): the attack shows leakage of at least ε = {bound:.2f} "
                  f"at δ = {delta:g}")
    elif red_flag:
        reason = (f"empirical ε lower bound {bound:.2f} exceeds the claimed ε = {claimed_epsilon:.2f}: the privacy "
                  "accounting understates the leakage or DP-SGD was not applied as accounted")
    else:
        reason = (f"empirical ε lower bound {bound:.2f} ≤ claimed ε = {claimed_epsilon:.2f}: consistent with the "
                  "claim (a weak attack's bound cannot confirm it)")
    return {
        "method": (f"loss-threshold membership inference (Yeom et al. 2018), score = −cross-entropy; ε lower bound "
                   f"(Jagielski et al. 2020): threshold chosen on a random half, one-sided Clopper–Pearson "
                   f"{confidence:.0%} bounds on FPR and FNR on the other half, seed {seed}"),
        "n_members": len(members),
        "n_non_members": len(non_members),
        "auc": float(roc_auc_score(is_member, scores)),
        "roc": {"fpr": roc_fpr[keep].tolist(), "tpr": roc_tpr[keep].tolist()},
        "threshold": float(threshold),
        "tpr": 1.0 - false_negatives / len(member_eval),
        "fpr": false_positives / len(non_member_eval),
        "fpr_upper": fpr_upper,
        "fnr_upper": fnr_upper,
        "evaluation_half": {"members": len(member_eval), "non_members": len(non_member_eval),
                            "false_negatives": false_negatives, "false_positives": false_positives},
        "epsilon_lower_bound": bound,
        "confidence": confidence,
        # Both Clopper–Pearson bounds hold together with probability ≥ 2·confidence − 1 (union bound).
        "joint_confidence": 2 * confidence - 1,
        "delta": delta,
        "claimed_epsilon": claimed_epsilon,
        "red_flag": bool(red_flag),
        "reason": reason,
    }


def _scores(values: Any, argument: str) -> np.ndarray:
    scores = np.asarray(values, dtype=float).ravel()
    if scores.size < 2:
        raise DataError(f"{argument}: need at least 2 samples (one per half), got {scores.size}")
    if not np.all(np.isfinite(scores)):
        raise DataError(f"{argument}: scores must be finite (a loss overflowed?)")
    return scores


def _halves(scores: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(scores))
    half = len(scores) // 2
    return scores[order[:half]], scores[order[half:]]


def _best_threshold(members: np.ndarray, non_members: np.ndarray, delta: float, confidence: float) -> float:
    """The score threshold (member if score ≥ threshold) with the largest ε bound on these samples.

    Candidates lie midway between consecutive distinct scores, so the chosen cut does not sit on a sample."""
    distinct = np.unique(np.r_[members, non_members])
    candidates = (distinct[:-1] + distinct[1:]) / 2 if len(distinct) > 1 else distinct
    members, non_members = np.sort(members), np.sort(non_members)
    false_negatives = np.searchsorted(members, candidates, side="left")
    false_positives = len(non_members) - np.searchsorted(non_members, candidates, side="left")
    bounds = epsilon_lower_bound(clopper_pearson_upper(false_positives, len(non_members), confidence),
                                 clopper_pearson_upper(false_negatives, len(members), confidence), delta)
    return float(candidates[int(np.argmax(bounds))])


# ---------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------
def run_privacy_audit(model: torch.nn.Module, run_dir: str | Path, *, site: str | None = None,
                      max_samples: int = 500, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """The run's accounting and, where the site's training data can be rebuilt (simulations), the membership
    inference audit of ``site`` (default: the site with the largest ε) against its claimed (ε, δ).

    Members: up to ``max_samples`` of the site's training samples; non-members: up to ``max_samples`` of its
    local held-out split (else the run's test dataset), both drawn with ``seed``.
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise ConfigError(f"max_samples: must be an integer ≥ 2, got {max_samples!r}")
    from audit.mechanism import noise_independence

    accounting = privacy_from_run(run_dir)
    record = read_run_record(Path(run_dir) / RUN_RECORD)
    mechanism = noise_independence(record)
    canary, canary_skipped = _canary(model, Path(run_dir), accounting, confidence)
    try:
        name, members, non_members, non_member_source = _site_samples(Path(run_dir), record, accounting, site)
    except _Skip as skip:
        return {"accounting": accounting, "mechanism": mechanism, "membership_inference": None,
                "skipped": str(skip), "canary": canary, "canary_skipped": canary_skipped}
    rng = np.random.default_rng(seed)
    members, non_members = _cap(members, max_samples, rng), _cap(non_members, max_samples, rng)
    claim = next((s for s in accounting["sites"] if s["site"] == name and s["epsilon"] is not None), None)
    result = membership_inference(model, members, non_members,
                                  claimed_epsilon=claim["epsilon"] if claim else None,
                                  delta=(claim["delta"] if claim and claim["delta"] is not None
                                         else accounting["delta"] or 1e-5),
                                  confidence=confidence, seed=seed)
    result.update({"site": name, "members_source": f"{name}'s training split (rebuilt from the run config)",
                   "non_members_source": non_member_source, "max_samples": max_samples})
    return {"accounting": accounting, "mechanism": mechanism, "membership_inference": result, "skipped": None,
            "canary": canary, "canary_skipped": canary_skipped}


def _canary(model: torch.nn.Module, run_dir: Path, accounting: dict, confidence: float):
    """(the one-run canary audit of the canaries' site against its claimed ε, None) or (None, why not)."""
    from audit.canary import CANARY_FILE, CANARY_SITE, run_canary_audit

    if not (run_dir / CANARY_FILE).exists():
        return None, "the run planted no canaries (run config canaries = 0, simulation only)"
    claim = next((s for s in accounting["sites"] if s["site"] == CANARY_SITE), None)
    if claim is None:
        return None, f"{CANARY_SITE}, which trained on the canaries, reported nothing in run.json"
    delta = claim["delta"] if claim["delta"] is not None else accounting["delta"] or 1e-5
    return run_canary_audit(model, run_dir, claimed_epsilon=claim["epsilon"], delta=delta,
                            confidence=confidence), None


class _Skip(Exception):
    """The membership inference audit cannot run on this machine; the message says why."""


def _site_samples(run_dir: Path, record: dict, accounting: dict, site: str | None):
    from fedvision.config import NodeConfig, RunConfig
    from fedvision.site import load_for_run, site_data

    simulation = run_dir / SIMULATION_FILE  # {"sites": N}, written by `fedvision run`: only simulations have it
    if not simulation.exists():
        raise _Skip("not a simulation: the sites' training data is on their premises, not on this machine")
    try:
        num_sites = int(json.loads(simulation.read_text())["sites"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{simulation}: cannot read the number of simulated sites ({e})") from None
    if site is None:
        accounted = [s for s in accounting["sites"] if s["epsilon"] is not None]
        site = max(accounted, key=lambda s: s["epsilon"])["site"] if accounted else "site-1"
    match = re.fullmatch(r"site-(\d+)", site)
    if not match or not 1 <= int(match.group(1)) <= num_sites:
        raise ConfigError(f"site: {site!r} is not a site of this simulation (site-1 … site-{num_sites})")
    run = RunConfig.from_mapping(record["config"])
    node = NodeConfig.from_mapping({"partition-id": int(match.group(1)) - 1, "num-partitions": num_sites})
    train, local_test = site_data(run, node, with_canaries=False)  # members: the site's own records only
    if local_test is not None and len(local_test) >= 2:
        return site, train.dataset, local_test.dataset, f"{site}'s local held-out split (never trained on)"
    if run.test_dataset:
        test = load_for_run(run, run.test_dataset, "test")
        return site, train.dataset, test.dataset, f"the run's test dataset {run.test_dataset!r}"
    raise _Skip(f"{site} has no held-out data (local-test-fraction 0, no test-dataset): no non-members to compare")


def _cap(dataset: torch.utils.data.Dataset, max_samples: int, rng: np.random.Generator) -> torch.utils.data.Dataset:
    if len(dataset) <= max_samples:
        return dataset
    return torch.utils.data.Subset(dataset, np.sort(rng.choice(len(dataset), max_samples, replace=False)).tolist())
