"""A site (hospital, factory): its data, its privacy ledger, local training and local evaluation.

Everything a ClientApp does, without Flower: ``client/app.py`` only turns Messages into these calls.
The site decides its own privacy (``fedvision.privacy.SitePolicy``, from its node config): it refuses a run
that asks for less than its policy before reading any data, keeps its ledger in its own state directory,
charges every release to it (training steps; noisy evaluation counts) and refuses what would exceed the budget.
What it sends and how private each value is: docs/privacy.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedvision.config import WEIGHT_ATTACKS, NodeConfig, RunConfig, named_split
from fedvision.dp import SECRET_SOURCE, PrivateRandomness, epsilon_rdp
from fedvision.errors import ConfigError, PolicyRefusal
from fedvision.groups import group_labels, group_sort_key
from fedvision.io import atomic_write, atomic_write_json, file_lock
from fedvision.models import create_model, state_digest
from fedvision.privacy import EVALUATION, PrivacyLedger, SitePolicy
from fedvision.train import TrainConfig, evaluate, steps_per_epoch, train_nonprivate, train_private

log = logging.getLogger("fedvision.site")

StateDict = dict[str, torch.Tensor]


def train_config(run: RunConfig, num_examples: int, policy: SitePolicy, proximal_mu: float = 0.0) -> TrainConfig:
    """The run config's local-training keys as a TrainConfig under the site's policy; σ is calibrated for the
    whole run's steps and the run's ε allotment."""
    planned = run.num_server_rounds * run.local_epochs * steps_per_epoch(num_examples, run.batch_size)
    return TrainConfig(epochs=run.local_epochs, batch_size=run.batch_size,
                       max_physical_batch_size=run.max_physical_batch_size, lr=run.lr, momentum=run.momentum,
                       max_grad_norm=run.max_grad_norm, noise_multiplier=run.noise_multiplier or None,
                       min_noise_multiplier=policy.min_noise_multiplier, epsilon_budget=policy.epsilon_budget,
                       run_epsilon=policy.run_allotment(run), delta=site_delta(run, policy), planned_steps=planned,
                       noise_std=run.noise_std, proximal_mu=proximal_mu, seed=run.seed,
                       # the audit's test hook; only simulated sites ever accept it (SitePolicy.refusal)
                       insecure_dp_seed=run.insecure_shared_dp_seed if run.insecure_shared_dp_seed >= 0 else None)


def site_delta(run: RunConfig, policy: SitePolicy) -> float:
    """The δ a site accounts this run at: its own, or the run's when that is stricter."""
    return run.delta if policy.simulated else min(run.delta, policy.delta)


def site_policy(run: RunConfig, node: NodeConfig) -> SitePolicy:
    """A deployed site's policy comes from its own node config alone; a simulated site's from the run config
    (in simulation the coordinator holds every partition anyway)."""
    if node.simulated:
        return SitePolicy(dp=run.dp, epsilon_budget=run.site_budget(node.partition_id), delta=run.delta,
                          evaluation_epsilon=run.evaluation_epsilon, exact_evaluation=run.exact_evaluation,
                          simulated=True)
    for key in ("epsilon_budget", "delta"):
        if not getattr(node, key):
            raise ConfigError(f"node config: '{key.replace('_', '-')}' is required: the site sets its own privacy "
                              "policy (see docs/privacy.md)")
    return SitePolicy(dp=True, epsilon_budget=node.epsilon_budget, delta=node.delta,
                      run_epsilon=node.run_epsilon or None, evaluation_epsilon=node.evaluation_epsilon,
                      exact_evaluation=node.exact_evaluation, min_noise_multiplier=node.min_noise_multiplier,
                      max_grad_norm=node.max_grad_norm or None)


def load_for_run(run: RunConfig, spec: str, split: str) -> Any:
    """Load ``spec`` as the run sees data: its image size, channels and (when configured) class order."""
    return _load(spec, run.image_size, run.channels, named_split(spec, split), run.class_names)


@functools.lru_cache(maxsize=4)
def _load(spec: str, image_size: int, channels: int, split: str | None, classes: tuple[str, ...] | None):
    # Simulated sites run as Ray actors that live across rounds: load each dataset once per process.
    from fedvision.data import load_dataset

    return load_dataset(spec, image_size=image_size, channels=channels, split=split,
                        classes=list(classes) if classes else None)


def _local_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / local-test split of a site's own data."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def site_data(run: RunConfig, node: NodeConfig, with_canaries: bool = True) -> tuple[Any, Any | None]:
    """A site's (training data, local test data or None), exactly as the site trains and evaluates on them.

    Reads no ledger and writes nothing, so the privacy audit can rebuild a simulated site's training members
    (``with_canaries=False``: without the canary audit's canaries, which simulated site-1 adds to its training data).
    """
    from fedvision.data import partition, subset

    if node.simulated:
        if node.partition_id >= node.num_partitions:
            raise ConfigError(f"node config: 'partition-id' {node.partition_id} ≥ 'num-partitions'")
        full = load_for_run(run, run.dataset, "train")
        parts = partition(full, run.partitioning, node.num_partitions, seed=run.seed)
        data = subset(full, parts[node.partition_id])
    else:
        if not node.data:
            raise ConfigError("node config: 'data' is required (e.g. data=manifest:/data/site/manifest.csv)")
        data = load_for_run(run, node.data, "train")
    if node.test_data:
        train, test = data, load_for_run(run, node.test_data, "test")
    elif run.local_test_fraction > 0 and len(data) >= 10:
        tr, te = _local_split(len(data), run.local_test_fraction, run.seed)
        train, test = subset(data, tr), subset(data, te)
    else:
        train, test = data, None
    if node.simulated and node.partition_id == 0 and run.canaries > 0 and with_canaries:
        from fedvision.data.canaries import CANARY_FILE, load_canaries, with_canaries as add_canaries

        train = add_canaries(train, load_canaries(Path(run.run_dir) / CANARY_FILE))  # after the local split
    return train, test


@dataclass
class Site:
    name: str
    train_data: Any  # fedvision.data.LoadedDataset
    test_data: Any | None
    state_dir: Path
    policy: SitePolicy
    run: RunConfig
    attack: list[str] | None = None  # simulation only: poison this site's updates (one attack per round, rotating)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_configs(cls, run: RunConfig, node: NodeConfig) -> "Site":
        """The site for this run; a run its policy does not allow is refused here, before any data is read."""
        if not node.simulated and not node.state_dir:
            raise ConfigError("node config: 'state-dir' is required (where the site keeps its privacy ledger)")
        policy = site_policy(run, node)
        if (reason := policy.refusal(run)) is not None:
            raise PolicyRefusal(reason)
        train, test = site_data(run, node)
        for data in (train, test):
            policy.check_records(len(data) if data is not None else 0,
                                 "run config" if node.simulated else "node config")
        if node.simulated:
            name = f"site-{node.partition_id + 1}"
            state_dir = Path(run.run_dir) / "sites" / name
        else:
            state_dir = Path(node.state_dir)
            name = node.site_name or state_dir.resolve().name
        return cls(name=name, train_data=train, test_data=test, state_dir=state_dir, policy=policy, run=run,
                   attack=run.attacks().get(name) if node.simulated else None)

    @property
    def delta(self) -> float:
        return site_delta(self.run, self.policy)

    @property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.state_dir / "ledger.json")

    def model(self, state: StateDict | None = None) -> torch.nn.Module:
        model = _model(self.run.model, len(self.train_data.classes), self.run.channels, self.run.image_size,
                       self.run.dp)
        if state is not None:
            model.load_state_dict(state)
        return model

    # -- training -----------------------------------------------------------------------------------------
    def train(self, global_state: StateDict, server_round: int, proximal_mu: float = 0.0) -> tuple[StateDict, dict]:
        """One round of local training from the global weights. Returns (new weights, metrics).

        A round the site already trained from the same global weights (the coordinator resumed after a crash
        and asks again) is answered from the site's round cache: no second training, no second privacy charge.
        """
        # One training per site at a time: a request delivered twice (the old and the resumed coordinator both
        # asked) waits here, then finds the first one's update in the cache.
        with file_lock(self.state_dir / "train.lock"):
            return self._train(global_state, server_round, proximal_mu)

    def _train(self, global_state: StateDict, server_round: int, proximal_mu: float) -> tuple[StateDict, dict]:
        digest = state_digest(global_state)
        cached = self._cached_reply(server_round, digest)
        if cached is not None:
            log.info("%s: round %d already trained from these global weights; replaying the cached update",
                     self.name, server_round)
            return cached
        model = self.model(global_state)
        cfg = train_config(self.run, len(self.train_data), self.policy, proximal_mu)
        trainer = train_private if self.run.dp else train_nonprivate
        ledger = self.ledger if self.run.dp else None  # read once; train_private appends to it
        # Each ledger entry names the run, round and global weights it was charged for, so an auditor can
        # check that no round was charged twice (the round cache above replays instead of charging again).
        result = trainer(model, self.train_data.dataset, cfg, ledger, global_params=global_state,
                         charge={"run": self.run.run_dir, "round": server_round, "global_sha256": digest})
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        attack = self._attack(server_round)
        # The training loss is not sent: it is computed on the training records without noise (docs/privacy.md).
        metrics = {"num-examples": len(self.train_data), "train-seconds": result.seconds, "steps": result.steps,
                   "dp": int(self.run.dp)}
        if attack.partition("=")[0] in WEIGHT_ATTACKS:
            state = poison(state, global_state, attack, seed=self.run.seed + server_round)
        if self.run.dp:
            metrics.update({"epsilon": result.epsilon, "epsilon-rdp": epsilon_rdp(ledger.history, self.delta),
                            "delta": self.delta,
                            "epsilon-budget": self.policy.epsilon_budget,
                            "noise-multiplier": result.noise_multiplier, "sample-rate": result.sample_rate,
                            "steps-total": ledger.steps, "secret-randomness": int(result.randomness == SECRET_SOURCE)})
        if attack == "extra":  # a reply outside its schema: the coordinator must reject it, not crash
            metrics["extra-key"] = 1.0
        elif attack.startswith("claim="):  # a lie about the data's size, which weighted averaging trusts
            metrics["num-examples"] = int(float(attack.partition("=")[2]))
        self._cache_reply(server_round, digest, state, metrics)
        return state, metrics

    def _attack(self, server_round: int) -> str:
        """Simulation only: this round's attack from ``simulated-attacks`` ('' for an honest round)."""
        return self.attack[(server_round - 1) % len(self.attack)] if self.attack else ""

    def privacy_metrics(self) -> dict[str, Any]:
        summary = self.ledger.summary(self.delta)
        metrics = {"epsilon": summary["epsilon"], "epsilon-rdp": summary["epsilon_rdp"], "delta": self.delta,
                   "epsilon-budget": self.policy.epsilon_budget,
                   "steps-total": summary["steps"], "noise-multiplier": summary["noise_multiplier"],
                   "sample-rate": summary["sample_rate"]}
        return {k: v for k, v in metrics.items() if v is not None}

    def _cache_path(self) -> Path:
        return self.state_dir / "round-cache.pt"

    def _cached_reply(self, server_round: int, digest: str):
        path = self._cache_path()
        if not path.exists():
            return None
        cached = torch.load(path, weights_only=True)
        if (cached.get("round"), cached.get("global"), cached.get("run")) == (server_round, digest, self.run.run_dir):
            metrics = json.loads(cached["metrics"])
            metrics.update(self.privacy_metrics() if self.run.dp else {})
            return cached["state"], metrics
        return None

    def _cache_reply(self, server_round: int, digest: str, state: StateDict, metrics: dict) -> None:
        payload = {"round": server_round, "global": digest, "run": self.run.run_dir, "state": state,
                   "metrics": json.dumps(metrics)}
        atomic_write(self._cache_path(), lambda f: torch.save(payload, f))

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, global_state: StateDict, server_round: int = 0, groups: bool = True) -> dict[str, Any]:
        """Accuracy on the site's local test data and per-group confusion counts, released under the site's policy.

        Tables: ``site`` (this site's whole matrix, or per value of the data's own site column) always; with
        ``groups``, also one per sensitive attribute and per pair of them (``"a×b"``, see ``fedvision.groups``),
        so fairness can be measured across the federation while no image leaves the site. By default every
        count gets Gaussian noise: one record is in one cell of each of the T tables (L2 sensitivity √T), so the
        noise std is σ·√T for a noise multiplier σ calibrated like training — over the run's planned
        evaluations, within the evaluation records' own budget — and charged to the ledger before release.
        Accuracy is computed from the noisy counts. A coordinator asking again for a round it already got (a
        resumed run) gets the same release, charged once."""
        release = self._evaluation(global_state, server_round, groups)
        if self._attack(server_round) == "badeval":  # tables of the wrong shape: rejected, never aggregated
            release = {**release, "groups": {"site": {self.name: [[1.0]]}}}
        return release

    def _evaluation(self, global_state: StateDict, server_round: int, groups: bool) -> dict[str, Any]:
        if self.test_data is None or len(self.test_data) == 0:  # nothing to release: no charge, no noise
            return {"num-examples": 0, "accuracy": 0.0, "count-noise-std": 0.0,
                    "exact-evaluation": int(self.policy.exact_evaluation), "classes": [], "groups": {}}
        with file_lock(self.state_dir / "evaluate.lock"):
            digest = state_digest(global_state)
            key = {"run": self.run.run_dir, "round": server_round, "global": digest, "groups": bool(groups)}
            cache = self.state_dir / "evaluation-cache.json"
            cached = json.loads(cache.read_text()) if cache.exists() else {}
            if cached.get("key") == key:
                release = cached["release"]
            else:
                release = self._release_evaluation(global_state, server_round, groups, digest)
                atomic_write_json(cache, {"key": key, "release": release})
        return release

    def _release_evaluation(self, global_state: StateDict, server_round: int, groups: bool, digest: str) -> dict:
        result = evaluate(self.model(global_state), self.test_data.dataset)
        k = len(self.test_data.classes)
        attrs = self.test_data.attributes
        present = {c: attrs[c] for c in self.run.sensitive_attributes if c in attrs.columns} if groups else {}
        if not groups and "site" in self.run.sensitive_attributes and "site" in attrs.columns:
            present = {"site": attrs["site"]}
        tables = {}
        for attribute, labels in group_labels(present).items():
            tables[attribute] = {g: confusion_counts(result.y_true[labels == g], result.y_pred[labels == g], k)
                                 for g in sorted(set(labels.tolist()), key=group_sort_key)}
        if "site" not in tables:  # the data's own site column, where present, says the same more precisely
            tables["site"] = {self.name: confusion_counts(result.y_true, result.y_pred, k)}
        ledger, randomness = self.ledger, PrivateRandomness.secret()
        charge = {"records": EVALUATION, "sample_rate": 1.0, "steps": 1, "delta": self.delta,
                  "run": self.run.run_dir, "round": server_round, "global_sha256": digest, "tables": len(tables),
                  "randomness": randomness.source}
        if self.policy.exact_evaluation:
            # The site chose to release exact counts: recorded as a release without noise (ε = ∞ for these records).
            epsilon = ledger.charge(noise_multiplier=0.0, exact=True, **charge)
            std = 0.0
        else:
            sigma = ledger.noise_for_run(delta=self.delta, sample_rate=1.0, planned_steps=self.run.num_server_rounds,
                                         budget=self.policy.epsilon_budget, run_epsilon=self.policy.evaluation_epsilon,
                                         run=self.run.run_dir, records=EVALUATION)
            epsilon = ledger.charge(noise_multiplier=sigma, budget=self.policy.epsilon_budget,
                                    run_epsilon=self.policy.evaluation_epsilon, **charge)
            std = sigma * math.sqrt(len(tables))
            for by_group in tables.values():
                for g, cm in by_group.items():
                    noise = randomness.gaussian(std, (k, k)).numpy()
                    by_group[g] = (np.asarray(cm, dtype=float) + noise).round(3).tolist()
        # Over the declared number of records, not the noisy total: the total's noise sums over all K² cells.
        overall = np.sum([np.asarray(cm) for cm in tables["site"].values()], axis=0)
        accuracy = float(np.clip(np.trace(overall) / result.num_examples, 0.0, 1.0))
        release = {"num-examples": result.num_examples, "accuracy": accuracy, "count-noise-std": std,
                   "exact-evaluation": int(self.policy.exact_evaluation), "classes": list(self.test_data.classes),
                   "groups": tables}
        if math.isfinite(epsilon):  # exact counts have no finite ε; "exact-evaluation" says so
            release["epsilon-evaluation"] = epsilon
        return release


def public_reason(message: str, node: NodeConfig) -> str:
    """``message`` fit to leave the site: its own paths relative to its data root (or state folder), any other
    absolute path cut to the file's name. Hospital paths often hold patient identifiers; the coordinator needs
    the file and the row, not where the site keeps them."""
    roots = []
    for spec in (node.data, node.test_data):
        kind, _, argument = spec.partition(":")
        if kind in ("folder", "manifest", "npz") and argument:
            path = Path(argument).expanduser()
            roots.append(path if kind == "folder" else path.parent)
    if node.state_dir:
        roots.append(Path(node.state_dir).expanduser())
    spellings = {str(r) for r in roots} | {str(r.resolve()) for r in roots}
    for root in sorted((r.rstrip("/") for r in spellings if r.startswith("/")), key=len, reverse=True):
        if root:
            message = message.replace(root + "/", "").replace(root, ".")
    return re.sub(r"(?<![\w.~-])/(?:[^\s/:'\"]+/)+([^\s/:'\"]*)", r"\1", message)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[list[int]]:
    """Confusion matrix as nested lists: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm.tolist()


@functools.lru_cache(maxsize=2)
def _template(name: str, num_classes: int, channels: int, image_size: int, dp: bool) -> torch.nn.Module:
    return create_model(name, num_classes, in_chans=channels, img_size=image_size, dp=dp)


def _model(name: str, num_classes: int, channels: int, image_size: int, dp: bool) -> torch.nn.Module:
    # create_model probes DP compatibility (a forward/backward pass); do it once per process and copy.
    import copy

    return copy.deepcopy(_template(name, num_classes, channels, image_size, dp))



def poison(state: StateDict, global_state: StateDict, attack: str, seed: int = 0) -> StateDict:
    """Simulated Byzantine site (for robustness tests and demos): nan, scale=K, signflip or noise=STD."""
    kind, _, arg = attack.partition("=")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        delta = v - global_state[k]
        if kind == "nan":
            out[k] = torch.full_like(v, math.nan)
        elif kind == "scale":
            out[k] = global_state[k] + float(arg or 100) * delta
        elif kind == "signflip":
            out[k] = global_state[k] - delta
        elif kind == "noise":
            out[k] = v + float(arg or 1.0) * torch.randn(v.shape, generator=g)
        else:
            raise ConfigError(f"unknown simulated attack {attack!r}")
    return out

