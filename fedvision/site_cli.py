"""``fedvision site status --state-dir DIR``: a site's spent and remaining ε, read from its own ledger."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedvision.errors import DataError


def add_parser(subparsers) -> None:
    site = subparsers.add_parser("site", help="a site's own state (privacy ledger)")
    commands = site.add_subparsers(dest="site_command", metavar="SITE_COMMAND", required=True)
    status = commands.add_parser("status", help="spent and remaining ε per record set, runs and rounds charged")
    status.add_argument("--state-dir", required=True, help="the site's state-dir (holds ledger.json)")
    status.add_argument("--delta", type=float, default=None, help="δ to report ε at (default: the last charge's)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from fedvision.privacy import PrivacyLedger

    path = Path(args.state_dir) / "ledger.json"
    if not path.exists():
        raise DataError(f"{path}: no privacy ledger (is --state-dir this site's state-dir?)")
    status = PrivacyLedger(path).status(args.delta)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(f"ledger {status['ledger']} ({status['accountant']} accountant)")
    if not status["record_sets"]:
        print("nothing charged yet")
    for records, s in status["record_sets"].items():
        budget = "no budget recorded" if s["budget"] is None else \
            f"of {s['budget']:g}, {s['remaining']:.3f} remaining"
        eps = "∞ (exact release)" if math.isinf(s["epsilon"]) else f"{s['epsilon']:.3f}"
        print(f"{records} records: ε = {eps} {budget} at δ={s['delta']:g}; {s['charges']} charges in "
              f"{len(s['runs'])} runs; randomness: {', '.join(s['randomness'])}")
        for run in s["runs"]:
            rounds = run["rounds"]
            span = f"rounds {rounds[0]}–{rounds[-1]}" if len(rounds) > 1 else \
                (f"round {rounds[0]}" if rounds else "no round")
            print(f"  run {run['run'] or '(unnamed)'}: {span}, {run['charges']} charges, "
                  f"ε {run['epsilon_before']:.3f} → {run['epsilon_after']:.3f}")
    return 0
