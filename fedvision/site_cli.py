"""``fedvision site``: a site's own state and what code it runs.

``status``: spent and remaining ε, read from the site's own ledger. ``approve``: add an app (a checkout folder or
a ``.fab``) to the site's list of approved apps. ``launcher``: write the ``flwr-clientapp`` that refuses every app
not on that list (fedvision/site_launcher.py; docs/deployment.md)."""

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
    approve = commands.add_parser("approve", help="approve an app: the sha256 of its Flower App Bundle")
    approve.add_argument("app", help="the reviewed checkout (as `flwr run APP` would package it) or a .fab file")
    approve.add_argument("--approved", required=True, help="the site's list of approved apps (created if missing)")
    approve.set_defaults(handler=_approve)
    launcher = commands.add_parser("launcher", help="write the flwr-clientapp that runs only approved apps")
    launcher.add_argument("--bin", required=True, help="folder for flwr-clientapp; put it first on the "
                                                       "SuperNode's PATH")
    launcher.add_argument("--approved", required=True, help="the site's list of approved apps")
    launcher.set_defaults(handler=_launcher)


def _approve(args: argparse.Namespace) -> int:
    from fedvision.approval import approve

    print(f"approved sha256 {approve(args.approved, args.app)} in {args.approved}")
    return 0


def _launcher(args: argparse.Namespace) -> int:
    from fedvision.approval import write_launcher

    print(f"wrote {write_launcher(args.bin, args.approved)}: start flower-supernode with {args.bin} first on PATH")
    return 0


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
