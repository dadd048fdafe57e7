"""A site's privacy: its ledger of every DP release it made, and the policy that bounds them.

The ledger is the site's own record and the only source of its ε. Each release is charged *before* it
happens (a crash mid-training must not make spent privacy disappear), the budget check and the charge are one
operation under the ledger's file lock (two processes cannot pass the budget together), and the file is
replaced atomically (temporary file, fsync, rename), so a SIGKILL at any moment leaves the previous history
or the new one. A corrupt ledger refuses to load rather than starting from zero.

Records are kept per *record set*: the training records and the local evaluation records are disjoint, so by
parallel composition a record's ε is that of its own set's releases. Each set's ε is bounded by the site's
lifetime budget; a run may take at most its allotment (``run_epsilon``) on top of what earlier runs spent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvision.dp import ACCOUNTANT, HistoryEntry, epsilon_of, noise_for_budget, validate_delta, validate_epsilon
from fedvision.errors import BudgetExceededError, ConfigError, DataError
from fedvision.io import atomic_write_json, file_lock

LEDGER_FORMAT = "fedvision-privacy-ledger/2"
_READABLE = ("fedvision-privacy-ledger/1", LEDGER_FORMAT)  # /1: training entries only, randomness unrecorded
TRAINING, EVALUATION = "training", "evaluation"
RECORD_SETS = (TRAINING, EVALUATION)
_EVERY_RUN = object()
SPENT_FRACTION = 0.05  # a run whose remaining allotment is below this share of it is refused (see noise_for_run)


class PrivacyLedger:
    """``PrivacyLedger(path)`` loads (or starts) a ledger; ``charge`` checks and appends in one locked step;
    ``epsilon(delta, records)`` composes one record set's history."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = self._load()

    # -- reading ---------------------------------------------------------------------------------------
    def _load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") not in _READABLE:
                raise ValueError(f"format {data.get('format')!r}")
            entries = data["entries"]
            for e in entries:
                float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
                e.setdefault("records", TRAINING)
                if e["records"] not in RECORD_SETS:
                    raise ValueError(f"unknown record set {e['records']!r}")
                e.setdefault("randomness", "unrecorded (ledger format /1)")
            return entries
        except Exception as e:
            raise DataError(f"{self.path}: privacy ledger is unreadable ({e}); refusing to continue, since "
                            "starting from an empty ledger would forget privacy already spent") from e

    def entries_of(self, records: str = TRAINING, exclude_run: Any = _EVERY_RUN) -> list[dict[str, Any]]:
        """One record set's entries, without those of run ``exclude_run`` (None: those charged without a run)."""
        return [e for e in self.entries if e["records"] == records
                and (exclude_run is _EVERY_RUN or e.get("run") != exclude_run)]

    def history_of(self, records: str = TRAINING, exclude_run: Any = _EVERY_RUN) -> list[HistoryEntry]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in self.entries_of(records, exclude_run)]

    @property
    def history(self) -> list[HistoryEntry]:
        """The training records' history."""
        return self.history_of(TRAINING)

    @property
    def steps(self) -> int:
        return sum(int(e["steps"]) for e in self.entries_of(TRAINING))

    def epsilon(self, delta: float, records: str = TRAINING) -> float:
        """Cumulative ε at ``delta`` of one record set over every release recorded for it."""
        return epsilon_of(self.history_of(records), delta)

    def noise_for_run(self, *, delta: float, sample_rate: float, planned_steps: int, budget: float,
                      run_epsilon: float | None, run: str | None, records: str = TRAINING,
                      max_noise_multiplier: float = 1e3) -> float:
        """The σ with which ``planned_steps`` steps of run ``run`` bring this record set's ε to its target.

        Target: what earlier runs spent plus the run's allotment ``run_epsilon`` (None: the rest of the
        lifetime ``budget``), capped at ``budget``. Computed from the other runs' entries only, so every round
        of one run gets the same σ. Raises BudgetExceededError when no σ up to ``max_noise_multiplier`` fits."""
        earlier = self.history_of(records, exclude_run=run)
        spent = epsilon_of(earlier, delta)
        allotment = budget if run_epsilon is None else run_epsilon
        target = min(budget, spent + allotment)
        # Calibration stops just short of its target, so a budget is never hit exactly; a run left with a sliver
        # of its allotment would be pure noise: the budget counts as spent.
        if target - spent < SPENT_FRACTION * allotment:
            raise BudgetExceededError(
                f"privacy budget spent: the {records} records are at ε={spent:.3f} of the lifetime budget "
                f"{budget:g} at δ={delta:g}, less than {SPENT_FRACTION:.0%} of this run's allotment {allotment:g} "
                "remains; refused before any step")
        return noise_for_budget(target, delta, sample_rate, planned_steps, max_noise_multiplier, history=earlier)

    # -- writing ---------------------------------------------------------------------------------------
    def charge(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               budget: float | None = None, run_epsilon: float | None = None, records: str = TRAINING,
               **info: Any) -> float:
        """Check the budget and append one release, as one operation under the ledger's lock; return the record
        set's ε after it. ``info`` (run, round, randomness…) is kept as-is.

        Refused (BudgetExceededError, ledger unchanged) when the record set's ε would pass ``budget`` or, for a
        run ``info["run"]``, when it would pass what the other runs spent plus ``run_epsilon``."""
        if not (noise_multiplier >= 0 and 0 < sample_rate <= 1 and int(steps) >= 0) or records not in RECORD_SETS:
            raise ValueError(f"invalid ledger entry: σ={noise_multiplier}, q={sample_rate}, steps={steps}, "
                             f"records={records!r}")
        validate_delta(delta)
        entry = {"records": records, "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
                 "steps": int(steps), "delta": float(delta), "budget": budget,
                 "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        # Check and append under one lock, on the file as it is now: another process may have charged since
        # this object was loaded, and two checks that each pass must not add up past the budget.
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self.entries = self._load()
            new = (entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
            before = self.epsilon(delta, records)
            after = epsilon_of(self.history_of(records) + [new], delta)
            if budget is not None:
                validate_epsilon(budget, "epsilon budget")
                if after > budget * (1 + 1e-9):
                    raise BudgetExceededError(
                        f"privacy budget exceeded: {steps} more steps (σ={noise_multiplier:.3g}, "
                        f"q={sample_rate:.3g}) would bring the {records} records' ε from {before:.3f} to "
                        f"{after:.3f} > budget {budget:g} at δ={delta:g}; refused before any step")
            if run_epsilon is not None:
                earlier = epsilon_of(self.history_of(records, exclude_run=info.get("run")), delta)
                if after > (earlier + run_epsilon) * (1 + 1e-9):
                    raise BudgetExceededError(
                        f"run allotment exceeded: this run would bring the {records} records' ε to {after:.3f}, "
                        f"more than {earlier:.3f} before the run + run-epsilon {run_epsilon:g}; refused before "
                        "any step")
            self.entries.append(entry)
            atomic_write_json(self.path, {"format": LEDGER_FORMAT, "accountant": ACCOUNTANT,
                                          "entries": self.entries})
        return after

    def summary(self, delta: float) -> dict[str, Any]:
        """The training records' ε: ``epsilon`` under the enforced ``accountant`` (PLD) and ``epsilon_rdp``, the
        RDP cross-check (``cross_check_accountant``), looser (larger) on any realistic ledger."""
        from fedvision.dp import CROSS_CHECK_ACCOUNTANT, epsilon_rdp

        trainings = self.entries_of(TRAINING)
        last = trainings[-1] if trainings else {}
        return {"epsilon": self.epsilon(delta), "epsilon_rdp": epsilon_rdp(self.history, delta), "delta": delta,
                "accountant": ACCOUNTANT, "cross_check_accountant": CROSS_CHECK_ACCOUNTANT, "steps": self.steps,
                "trainings": len(trainings), "noise_multiplier": last.get("noise_multiplier"),
                "sample_rate": last.get("sample_rate")}


    def status(self, delta: float | None = None) -> dict[str, Any]:
        """Per record set: ε spent, the lifetime budget, what remains, and each run's share (runs in the order
        they were first charged, each with the cumulative ε after it). ``delta`` defaults to the last charge's."""
        out: dict[str, Any] = {"ledger": str(self.path), "accountant": ACCOUNTANT, "record_sets": {}}
        for records in RECORD_SETS:
            entries = self.entries_of(records)
            if not entries:
                continue
            d = delta if delta is not None else float(entries[-1].get("delta") or 1e-5)
            budget = entries[-1].get("budget")
            runs: dict[str, list[dict[str, Any]]] = {}
            for e in entries:
                runs.setdefault(str(e.get("run", "")), []).append(e)
            so_far: list[HistoryEntry] = []
            per_run = []
            for run, charged in runs.items():
                before = epsilon_of(so_far, d)
                so_far += [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in charged]
                after = epsilon_of(so_far, d)
                per_run.append({"run": run, "rounds": sorted({e.get("round") for e in charged if e.get("round")}),
                                "charges": len(charged), "epsilon_before": before, "epsilon_after": after})
            spent = self.epsilon(d, records)
            out["record_sets"][records] = {
                "epsilon": spent, "delta": d, "budget": budget,
                "remaining": None if budget is None else max(float(budget) - spent, 0.0),
                "charges": len(entries), "steps": sum(int(e["steps"]) for e in entries), "runs": per_run,
                "randomness": sorted({str(e.get("randomness")) for e in entries}),
                "exact_releases": sum(1 for e in entries if e.get("exact"))}
        return out


# ---------------------------------------------------------------------------------------------------------
# The site's policy
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SitePolicy:
    """What a site allows, set by the site alone (its node config; in simulation, where the coordinator holds
    every partition anyway, by the run config). A run may only ask for something at least as strict."""

    dp: bool  # a deployed site always trains with DP
    epsilon_budget: float  # lifetime ε per record set (training records; local evaluation records)
    delta: float
    run_epsilon: float | None = None  # what one run may add to the training records' ε (None: the rest)
    evaluation_epsilon: float = 1.0  # what one run may add to the evaluation records' ε
    exact_evaluation: bool = False  # release exact evaluation counts (not private; the report names it)
    min_noise_multiplier: float = 0.0
    # A ceiling on the run's clipping bound C. Not a privacy parameter (the noise is σ·C, so ε does not depend
    # on C); it bounds how far one record can move a step, a utility and robustness limit the site sets.
    max_grad_norm: float | None = None
    simulated: bool = False

    def refusal(self, run: Any) -> str | None:
        """Why this site refuses run config ``run`` (a ``fedvision.config.RunConfig``), or None to accept it."""
        if self.simulated:
            return None
        if not run.dp:
            return "the run asks dp=false; this site's policy requires DP"
        if run.insecure_shared_dp_seed >= 0:
            return ("the run asks insecure-shared-dp-seed (reproducible DP noise); this site's policy requires fresh "
                    "secret noise")
        if run.canaries > 0:
            return "the run asks canaries (a simulation-only audit hook); this site never trains on injected records"
        if run.delta > self.delta:
            return f"the run asks delta={run.delta:g}; this site's policy allows at most {self.delta:g}"
        if 0 < run.noise_multiplier < self.min_noise_multiplier:
            return (f"the run asks noise-multiplier={run.noise_multiplier:g}; this site's policy requires at least "
                    f"{self.min_noise_multiplier:g}")
        if self.max_grad_norm is not None and run.max_grad_norm > self.max_grad_norm:
            return (f"the run asks max-grad-norm={run.max_grad_norm:g}; this site's policy allows at most "
                    f"{self.max_grad_norm:g}")
        return None

    def run_allotment(self, run: Any) -> float | None:
        """The training records' ε this run may add: the site's ``run-epsilon``, lowered to the run's own
        ``epsilon-budget`` (a stricter request is honoured). In simulation the run's budget is the lifetime."""
        if self.simulated:
            return self.run_epsilon
        asked = float(run.epsilon_budget)
        return asked if self.run_epsilon is None else min(asked, self.run_epsilon)

    def check_records(self, num_records: int, where: str) -> None:
        """δ must be below 1/N: a δ of 1/N allows releasing one record outright."""
        if num_records and self.delta >= 1.0 / num_records:
            raise ConfigError(f"{where}: 'delta' {self.delta:g} must be < 1/N = {1.0 / num_records:.3g} for this "
                              f"site's {num_records} records")
