"""A site's privacy ledger: every DP training it ever ran for a federation, composed with the RDP accountant.

The ledger is the site's own record and the only source of its ε. Each training is charged *before*
its first step (a crash mid-training must not make spent privacy disappear), and the file is replaced
atomically (temporary file, fsync, rename), so a SIGKILL at any moment leaves the previous history or
the new one. A corrupt ledger refuses to load rather than starting from zero.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedvision.dp import ACCOUNTANT, HistoryEntry, epsilon_of, validate_delta, validate_epsilon
from fedvision.errors import BudgetExceededError, DataError
from fedvision.io import atomic_write_json, file_lock

LEDGER_FORMAT = "fedvision-privacy-ledger/1"


class PrivacyLedger:
    """``PrivacyLedger(path)`` loads (or starts) a ledger; ``record`` appends; ``epsilon(delta)`` composes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = self._load()

    # -- reading ---------------------------------------------------------------------------------------
    def _load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            entries = data["entries"]
            for e in entries:
                float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
            return entries
        except Exception as e:
            raise DataError(f"{self.path}: privacy ledger is unreadable ({e}); refusing to continue, since "
                            "starting from an empty ledger would forget privacy already spent") from e

    @property
    def history(self) -> list[HistoryEntry]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries]

    @property
    def steps(self) -> int:
        return sum(int(e["steps"]) for e in self.entries)

    def epsilon(self, delta: float) -> float:
        """Cumulative ε at ``delta`` over every recorded training (RDP composition)."""
        return epsilon_of(self.history, delta)

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """The cumulative ε this site would have after one more training with these parameters."""
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], delta)

    def check_budget(self, epsilon_budget: float, delta: float, noise_multiplier: float, sample_rate: float,
                     steps: int) -> float:
        """Raise BudgetExceededError unless the planned training keeps ε within budget; return ε after it."""
        validate_epsilon(epsilon_budget, "epsilon budget")
        validate_delta(delta)
        after = self.epsilon_after(delta, noise_multiplier, sample_rate, steps)
        if after > epsilon_budget * (1 + 1e-9):
            raise BudgetExceededError(
                f"privacy budget exceeded: {steps} more steps (σ={noise_multiplier:.3g}, q={sample_rate:.3g}) "
                f"would bring ε from {self.epsilon(delta):.3f} to {after:.3f} > budget {epsilon_budget:g} "
                f"at δ={delta:g}; training refused before any step")
        return after

    # -- writing ---------------------------------------------------------------------------------------
    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int, **info: Any) -> None:
        """Append one training and write the ledger atomically. ``info`` (round, run id…) is kept as-is."""
        if not (noise_multiplier >= 0 and 0 < sample_rate <= 1 and int(steps) >= 0):
            raise ValueError(f"invalid ledger entry: σ={noise_multiplier}, q={sample_rate}, steps={steps}")
        entry = {"noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
                 "steps": int(steps), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        with file_lock(self.path.with_name(self.path.name + ".lock")):  # two writers must not lose an entry
            self.entries = self._load()  # another process may have recorded since we loaded
            self.entries.append(entry)
            atomic_write_json(self.path, {"format": LEDGER_FORMAT, "accountant": ACCOUNTANT,
                                          "entries": self.entries})

    def summary(self, delta: float) -> dict[str, Any]:
        last = self.entries[-1] if self.entries else {}
        return {"epsilon": self.epsilon(delta), "delta": delta, "accountant": ACCOUNTANT, "steps": self.steps,
                "trainings": len(self.entries), "noise_multiplier": last.get("noise_multiplier"),
                "sample_rate": last.get("sample_rate")}
