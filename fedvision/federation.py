"""The coordinator's logic, without Flower: update validation, the run record, checkpoints and resume.

``server/app.py`` runs the rounds with Flower's Grid and strategies and calls into this module for every
decision and every file it writes. The server never computes a site's ε: it records what sites report.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedvision
from fedvision.config import RunConfig
from fedvision.dp import ACCOUNTANT
from fedvision.errors import ConfigError, DataError, MalformedReply, UpdateRejected
from fedvision.io import atomic_write, atomic_write_json, hold_lock
from fedvision.messages import EvaluateReply, TrainReply
from fedvision.models import create_model, save_model, state_digest

log = logging.getLogger("fedvision.coordinator")

CHECKPOINT = "checkpoint.pt"
RUN_RECORD = "run.json"
GLOBAL_MODEL = "global_model.pt"
RUN_FORMAT = "fedvision-run/1"
# Run-config keys a resumed run may change: how long to wait and how many rounds. Anything else (privacy, data,
# model, training) would make the resumed rounds a different experiment than the recorded ones.
RESUMABLE_CHANGES = ("resume", "num-server-rounds", "round-timeout", "min-train-nodes", "min-available-nodes")


# ---------------------------------------------------------------------------------------------------------
# Update validation
# ---------------------------------------------------------------------------------------------------------
def validate_update(reference: dict[str, np.ndarray], update: dict[str, np.ndarray], max_norm: float) -> float:
    """Check a site's weights against the global model's; return the update's L2 norm or raise UpdateRejected.

    Same keys, shapes and dtypes; every value finite; ‖update − global‖₂ ≤ ``max_norm`` (0 disables).
    """
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
        raise UpdateRejected("keys differ from the global model: " + "; ".join(parts))
    sq = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            raise UpdateRejected(f"'{key}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if arr.dtype != ref.dtype:
            raise UpdateRejected(f"'{key}' has dtype {arr.dtype}, expected {ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise UpdateRejected(f"'{key}' contains NaN or infinite values")
            sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = sq ** 0.5
    if max_norm and norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds max-update-norm {max_norm:g}")
    return norm


def versions(*packages: str) -> dict[str, str]:
    """Versions of fedvision, Python and the packages a run depends on, plus ``packages`` (the audit adds its own)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"fedvision": fedvision.__version__, "python": platform.python_version()}
    for pkg in ("flwr", "torch", "opacus", "timm", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------------------
# The coordinator
# ---------------------------------------------------------------------------------------------------------
class Coordinator:
    """Owns the run folder: the global model, checkpoints, ``run.json``; screens every update."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.dir = Path(run.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # One coordinator per run folder: a second one (a resume started while the first still runs) would
        # interleave checkpoints. The lock goes with the process, so a killed coordinator leaves none behind.
        self._lock = hold_lock(self.dir / "run.lock", f"run-dir {self.dir} is in use by another coordinator")
        self.round = 0
        self._geometry: dict[str, Any] = {}  # the last screened round's update norms and pairwise distances
        self._told: set[tuple[str, str]] = set()  # (node, other name) already logged
        self.record: dict[str, Any] = {
            "format": RUN_FORMAT, "config": run.to_mapping(), "versions": versions(),
            "started": _now(), "rounds": [], "sites": {}, "nodes": {}, "rejected": [], "refused": [], "failed": [], "suspects": [],
            "resumes": [], "status": "running",
        }

    # -- start / resume -----------------------------------------------------------------------------------
    def initial_model(self) -> torch.nn.Module:
        torch.manual_seed(self.run.seed)  # every fresh run of one config starts from the same weights
        return create_model(self.run.model, self._num_classes(), in_chans=self.run.channels,
                            img_size=self.run.image_size, dp=self.run.dp)

    def _model_with(self, global_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """One model object for the whole run, loaded with ``global_state`` (creation runs a DP probe)."""
        if not hasattr(self, "_model"):
            self._model = create_model(self.run.model, len(self._classes), in_chans=self.run.channels,
                                       img_size=self.run.image_size, dp=self.run.dp)
        self._model.load_state_dict(global_state)
        return self._model

    @property
    def classes(self) -> list[str]:
        """The run's class names in label order (every site's evaluation counts must use them)."""
        self._num_classes()
        return self._classes

    def _num_classes(self) -> int:
        if not hasattr(self, "_classes"):
            from fedvision.site import load_for_run

            names = self.run.class_names
            if names is None:
                spec = self.run.test_dataset or self.run.dataset
                names = load_for_run(self.run, spec, "test" if self.run.test_dataset else "train").classes
            self._classes = list(names)
        return len(self._classes)

    def start(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(global weights, strategy state) to start from: the last checkpoint when resuming, else fresh."""
        path = self.dir / CHECKPOINT
        if self.run.resume:
            if not path.exists():
                raise ConfigError(f"resume: no checkpoint in {self.dir} (run-dir)")
            ckpt = torch.load(path, weights_only=True)
            self.round = int(ckpt["round"])
            self.record = json.loads(ckpt["record"])
            changed = config_changes(self.record["config"], self.run.to_mapping())
            if refused := {k: v for k, v in changed.items() if k not in RESUMABLE_CHANGES}:
                raise ConfigError("resume: the run config differs from the recorded run's in " + "; ".join(
                    f"{k}: {old!r} → {new!r}" for k, (old, new) in refused.items()) +
                    f" (a resumed run may change only {', '.join(RESUMABLE_CHANGES[1:])}; start a new run-dir "
                    "for a different experiment)")
            self.record["config"] = self.run.to_mapping()
            self.record.setdefault("nodes", {})
            self.record["resumes"].append({"at": _now(), "from_round": self.round,
                                           "changed": {k: v for k, v in changed.items() if k != "resume"}})
            self.record["status"] = "running"
            self._classes = self.record["classes"]
            log.info("resuming %s after round %d of %d", self.dir, self.round, self.run.num_server_rounds)
            return ckpt["state"], ckpt["strategy"]
        if path.exists():
            raise ConfigError(f"run-dir {self.dir} already holds a run; resume it or choose another folder")
        model = self.initial_model()
        self.record["classes"] = self._classes
        # The audit's noise-independence check needs the dimension the DP noise lives in.
        self.record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.record["initial_sha256"] = state_digest(model.state_dict())
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, {}

    # -- sites --------------------------------------------------------------------------------------------
    def know_nodes(self, registered: dict[int, str]) -> None:
        """Names the coordinator's operators gave nodes at registration (``flwr supernode register --name``),
        which Flower binds to each node's authenticated key: they name those sites, whatever a site reports."""
        nodes, fixed = self.record["nodes"], set(self.record.setdefault("registered_nodes", []))
        for node_id, name in registered.items():
            key = str(node_id)
            if name and key not in fixed:
                for other in [k for k, v in nodes.items() if v == name and k not in fixed]:
                    del nodes[other]  # an earlier unauthenticated claim on the name gives way
                nodes[key] = name
                fixed.add(key)
        self.record["registered_nodes"] = sorted(fixed)

    def site_of(self, node_id: int, claimed: str | None = None, answered: set[int] = frozenset()) -> str:
        """The name of the site behind Flower node ``node_id``.

        A node registered with a name (``know_nodes``) is that name. Otherwise a node keeps the first name it
        reported for the whole run, and a node that never replied is ``node-ID``. A name another node holds is
        refused when that node is registered or answered this round (``answered``): one site cannot speak
        twice or for another. An unregistered site that comes back as a new node (restarted) takes its name
        over, which the log says."""
        nodes: dict[str, str] = self.record["nodes"]
        fixed = set(self.record.get("registered_nodes", []))
        key = str(node_id)
        if key in nodes:
            if claimed and claimed != nodes[key] and (key, claimed) not in self._told:
                self._told.add((key, claimed))  # said once, not every round
                log.warning("node %s reports name %r but is %r in this run; keeping %r", key, claimed, nodes[key],
                            nodes[key])
            return nodes[key]
        if not claimed:
            return f"node-{node_id}"
        holders = [other for other, name in nodes.items() if name == claimed]
        if any(int(other) in answered or other in fixed for other in holders):
            raise MalformedReply(f"reports the name {claimed!r}, which node {holders[0]} holds in this run")
        for other in holders:
            log.warning("%s now answers from node %s (was node %s)", claimed, key, other)
            del nodes[other]
        nodes[key] = claimed
        return claimed

    def aggregation_weights(self, server_round: int, replies: list[TrainReply], accepted: list[int]) -> dict[int, int]:
        """Each accepted update's weight in a weighted average: its site's num-examples, capped.

        A site's example count cannot be checked, and FedAvg weights by it: one site claiming 10⁹ examples would
        be the average. So no site weighs more than ``max-weight-ratio`` × the lower median of the round's
        counts; a capped site is recorded as a suspect."""
        claimed = {i: int(replies[i].metrics["num-examples"]) for i in accepted}
        if not claimed or not self.run.max_weight_ratio:
            return claimed
        counts = sorted(claimed.values())
        cap = max(1, int(self.run.max_weight_ratio * counts[(len(counts) - 1) // 2]))
        for i, n in claimed.items():
            if n > cap:
                reason = (f"claims {n} examples, more than max-weight-ratio {self.run.max_weight_ratio:g} × the "
                          f"round's median count; weighted as {cap}")
                log.warning("round %d: %s suspect: %s", server_round, replies[i].site, reason)
                self.record["suspects"].append({"round": server_round, "site": replies[i].site, "reason": reason})
                replies[i].metrics["aggregation-weight"] = cap
        return {i: min(n, cap) for i, n in claimed.items()}

    # -- a round ------------------------------------------------------------------------------------------
    def screen(self, server_round: int, replies: list[TrainReply], global_state: dict[str, torch.Tensor]) -> list[int]:
        """Indices of the replies to aggregate; everything else is logged once and recorded with its reason."""
        reference = {k: v.numpy() for k, v in global_state.items()}
        valid: dict[int, float] = {}
        for i, reply in enumerate(replies):
            if reply.error is not None:
                self._note("failed", server_round, reply.site, reply.error)
            elif reply.rejected is not None:
                self._note("rejected", server_round, reply.site, reply.rejected)
            elif reply.refusal is not None:
                self._note("refused", server_round, reply.site, reply.refusal)
            else:
                try:
                    valid[i] = validate_update(reference, reply.arrays or {}, self.run.max_update_norm)
                except UpdateRejected as e:
                    self._note("rejected", server_round, reply.site, str(e))
        # Norm outliers: with three or more valid updates, one far larger than the round's median is a scaled
        # (boosted) update even when it stays below the absolute bound.
        if len(valid) >= 3 and self.run.max_norm_ratio:
            median = float(np.median(list(valid.values())))
            for i, norm in list(valid.items()):
                if median > 0 and norm > self.run.max_norm_ratio * median:
                    self._note("rejected", server_round, replies[i].site,
                               f"update norm {norm:.3g} is {norm / median:.0f}× the round's median {median:.3g} "
                               f"(max-norm-ratio {self.run.max_norm_ratio:g})")
                    del valid[i]
        for i, norm in valid.items():
            replies[i].metrics["update-norm"] = norm
        self._geometry = update_geometry(reference, {replies[i].site: replies[i].arrays for i in valid})
        return sorted(valid)

    def _note(self, kind: str, server_round: int, site: str, reason: str) -> None:
        log.warning("round %d: %s %s: %s", server_round, site, kind, reason)
        self.record[kind].append({"round": server_round, "site": site, "reason": reason})

    def name_opposing(self, server_round: int, replies: list[TrainReply], accepted: list[int],
                      before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        """Record each aggregated update's cosine to the aggregate update and name the sites that pull against it.

        A robust rule (median, trimmed mean, Krum) already limits what one site can do; a sign-flipped update
        then points away from the aggregate (cosine < 0), which an honest site's update does not."""
        keys = [k for k, v in before.items() if v.is_floating_point()]
        ref = {k: before[k].double().numpy().ravel() for k in keys}
        aggregate = np.concatenate([after[k].double().numpy().ravel() - ref[k] for k in keys])
        if not accepted or not np.any(aggregate):
            return
        for i in accepted:
            update = np.concatenate([np.asarray(replies[i].arrays[k], np.float64).ravel() - ref[k] for k in keys])
            cosine = float(update @ aggregate / max(np.linalg.norm(update) * np.linalg.norm(aggregate), 1e-30))
            replies[i].metrics["cosine-to-aggregate"] = cosine
            if cosine < 0:
                log.warning("round %d: %s suspect: its update opposes the aggregate (cosine %.2f)", server_round,
                            replies[i].site, cosine)
                self.record["suspects"].append({"round": server_round, "site": replies[i].site, "reason":
                                                f"update opposes the aggregate (cosine {cosine:.2f}); "
                                                "sign-flipped or adversarial?"})

    def finish_round(self, server_round: int, replies: list[TrainReply], accepted: list[int], aggregated: bool,
                     evaluations: list[EvaluateReply], central: dict[str, float] | None, seconds: float,
                     parent_sha256: str = "") -> None:
        site_rows = {}
        for i, r in enumerate(replies):
            row = {k: v for k, v in r.metrics.items()}
            row["accepted"] = i in accepted
            site_rows[r.site] = row
            if "epsilon" in r.metrics:  # what the site's ledger says, cumulative (a refusing site reports it too)
                before = self.record["sites"].get(r.site, {})
                self.record["sites"][r.site] = {**before,
                    "num_examples": int(r.metrics.get("num-examples") or before.get("num_examples", 0)),
                    "epsilon": r.metrics["epsilon"], "epsilon_rdp": r.metrics.get("epsilon-rdp"),
                    "delta": r.metrics.get("delta"),
                    "epsilon_budget": r.metrics.get("epsilon-budget"),
                    "noise_multiplier": r.metrics.get("noise-multiplier", before.get("noise_multiplier")),
                    "sample_rate": r.metrics.get("sample-rate", before.get("sample_rate")),
                    "steps": int(r.metrics.get("steps-total", 0)), "accountant": ACCOUNTANT,
                    "secret_randomness": bool(r.metrics.get("secret-randomness", before.get("secret_randomness"))),
                    "last_round": server_round}
            elif r.metrics.get("num-examples"):
                self.record["sites"].setdefault(r.site, {})["num_examples"] = int(r.metrics["num-examples"])
        train_seconds = [r.metrics.get("train-seconds", 0.0) for r in replies if r.arrays is not None]
        site_time = max(train_seconds, default=0.0)  # sites train in parallel
        for e in evaluations:
            if e.rejected is not None:
                self._note("rejected", server_round, e.site, f"evaluate reply: {e.rejected}")
        for e in evaluations:  # the evaluation records' ε, a separate record set (parallel composition)
            if e.error is None and e.rejected is None and "exact-evaluation" in e.metrics:
                self.record["sites"].setdefault(e.site, {}).update({
                    "epsilon_evaluation": e.metrics.get("epsilon-evaluation"),
                    "evaluation_examples": int(e.metrics.get("num-examples", 0)),
                    "exact_evaluation": bool(e.metrics.get("exact-evaluation", 0))})
        evaluation = federated_evaluation(evaluations)
        self.record["rounds"].append({
            "round": server_round, "parent_sha256": parent_sha256, "aggregated": aggregated,
            "accepted": [replies[i].site for i in accepted], "updates": self._geometry,
            "sites": site_rows, "evaluate": evaluation, "central": central,
            "timing": {"round_seconds": seconds, "site_training_seconds": site_time,
                       "other_seconds": max(seconds - site_time, 0.0)}})
        self.round = server_round

    # -- files --------------------------------------------------------------------------------------------
    def checkpoint(self, global_state: dict[str, torch.Tensor], strategy_state: dict[str, Any]) -> None:
        """Write checkpoint, global model and run record for the round just finished (each atomically).

        The checkpoint alone is enough to resume; it is written first, so a crash between the writes leaves a
        resumable run whose other files are at most one round behind."""
        if self.record["rounds"]:  # the lineage: round k's parent_sha256 is round k-1's global_sha256
            self.record["rounds"][-1]["global_sha256"] = state_digest(global_state)
        payload = {"round": self.round, "state": {k: v.detach().cpu() for k, v in global_state.items()},
                   "strategy": strategy_state, "record": json.dumps(self.record)}
        atomic_write(self.dir / CHECKPOINT, lambda f: torch.save(payload, f))
        self.save_model(global_state)
        self.write_record()

    def save_model(self, global_state: dict[str, torch.Tensor]) -> None:
        save_model(self._model_with(global_state), self.dir / GLOBAL_MODEL, {
            "class_names": self._classes, "noise_std": self.run.noise_std, "round": self.round,
            "trained_with": {"strategy": self.run.strategy, "dp": self.run.dp, "dataset": self.run.dataset}})

    def finish(self) -> None:
        """The run's last record: completed, or failed when no round aggregated an update (the global model then
        holds the initial weights, which nobody should mistake for a trained model)."""
        if any(r["aggregated"] for r in self.record["rounds"]):
            self.write_record(status="completed")
        else:
            self.record["reason"] = "no round aggregated an update: global_model.pt holds the initial weights"
            log.error("run failed: %s", self.record["reason"])
            self.write_record(status="failed")

    def write_record(self, status: str | None = None) -> None:
        if status:
            self.record["status"] = status
            self.record["finished"] = _now()
        self.record["completed_rounds"] = self.round
        atomic_write_json(self.dir / RUN_RECORD, self.record)

    # -- central evaluation -------------------------------------------------------------------------------
    def central_evaluate(self, global_state: dict[str, torch.Tensor]) -> dict[str, float] | None:
        if not self.run.test_dataset:
            return None
        from fedvision.train import evaluate

        if not hasattr(self, "_test"):
            from fedvision.site import load_for_run

            self._test = load_for_run(self.run, self.run.test_dataset, "test")
        result = evaluate(self._model_with(global_state), self._test.dataset)
        return {"accuracy": result.accuracy, "loss": result.loss, "num-examples": result.num_examples}


def federated_evaluation(evaluations: list[EvaluateReply]) -> dict[str, Any]:
    """Example-weighted accuracy over sites and per-group confusion counts summed over sites."""
    ok = [e for e in evaluations if e.error is None and e.rejected is None and e.metrics.get("num-examples")]
    n = sum(e.metrics["num-examples"] for e in ok)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for e in ok:
        for attr, by_group in e.groups.items():
            for g, cm in by_group.items():
                acc = groups.setdefault(attr, {})
                acc[g] = acc.get(g, 0) + np.asarray(cm)
    # Each site's noise is independent: the summed counts' noise std is the root of the sum of variances.
    noise_std = float(np.sqrt(sum(float(e.metrics.get("count-noise-std", 0.0)) ** 2 for e in ok)))
    return {
        "num_examples": int(n),
        "count_noise_std": noise_std,
        "accuracy": (sum(e.metrics["accuracy"] * e.metrics["num-examples"] for e in ok) / n) if n else None,
        "sites": {e.site: {"accuracy": e.metrics.get("accuracy"), "num_examples": e.metrics.get("num-examples")}
                  for e in ok},
        "group_confusion": {a: {g: cm.tolist() for g, cm in gs.items()} for a, gs in groups.items()},
        "classes": ok[0].classes if ok else [],
    }


def update_geometry(reference: dict[str, np.ndarray], updates: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Norms of the valid updates (weights − global) and, for each pair of sites, distance and cosine.

    Kept in run.json so an auditor can test, from what the coordinator saw, that sites' DP noise is independent:
    two updates carrying the same noise are far closer than independent noise of their size allows."""
    keys = [k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)]
    vectors = {site: np.concatenate([(np.asarray(arrays[k], np.float64) - reference[k]).ravel() for k in keys])
               for site, arrays in updates.items()}
    norms = {site: float(np.linalg.norm(v)) for site, v in vectors.items()}
    pairs = {}
    names = sorted(vectors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            denominator = max(norms[a] * norms[b], 1e-30)
            pairs[f"{a}|{b}"] = {"distance": float(np.linalg.norm(vectors[a] - vectors[b])),
                                 "cosine": float(vectors[a] @ vectors[b] / denominator)}
    return {"norms": norms, "pairs": pairs}


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded value, current value)} for every run-config key whose value differs."""
    return {k: (recorded.get(k), current.get(k)) for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)}


def read_run_record(path: str | Path) -> dict[str, Any]:
    """``run.json`` as a dict; a missing, unreadable or foreign file raises DataError naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no run record (is this a fedvision run folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the run record ({e})") from None
    if not isinstance(record, dict) or not str(record.get("format", "")).startswith("fedvision-run/") \
            or not isinstance(record.get("sites", {}), dict):
        raise DataError(f"{path}: not a fedvision run record (expected format fedvision-run/…)")
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
