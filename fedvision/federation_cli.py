"""``fedvision run`` and ``fedvision demo``: simulations through Flower's own engine (``flwr run``).

The run config is validated here first (a bad key fails before Flower starts), written into the run folder
as ``run-config.toml`` and handed to ``flwr run`` with a private ``FLWR_HOME`` and runtime dependency
installation disabled. Flower's full output goes to ``RUN_DIR/flwr.log``; the terminal shows fedvision's
own progress lines once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedvision.config import RunConfig
from fedvision.errors import ConfigError, DataError, FedVisionError, ModelError
from fedvision.io import atomic_write_json, atomic_write_text

APP_DIR = Path(__file__).resolve().parent.parent  # the repository root: pyproject.toml with [tool.flwr.app]
SIMULATION_FILE = "simulation.json"


def app_defaults() -> dict[str, Any]:
    pyproject = APP_DIR / "pyproject.toml"
    try:
        return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError) as e:
        raise ConfigError(f"{pyproject}: no [tool.flwr.app.config] (fedvision must run from its source tree)") from e


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def simulate(overrides: dict[str, Any], sites: int, quiet: bool = False) -> Path:
    """Run a simulation of ``sites`` sites with the app defaults plus ``overrides``; return the run folder."""
    values = {**app_defaults(), **overrides}
    run = RunConfig.from_mapping(values)  # fail here, before Flower starts, on any bad key or value
    if sites < 1:
        raise ConfigError(f"--sites must be ≥ 1, got {sites}")
    if run.min_available_nodes > sites or run.min_train_nodes > sites:
        values["min-available-nodes"] = min(run.min_available_nodes, sites)
        values["min-train-nodes"] = min(run.min_train_nodes, sites)
        run = RunConfig.from_mapping(values)
    _check_model(run)
    run_dir = Path(run.run_dir).resolve()
    values["run-dir"] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "run-config.toml"
    atomic_write_text(config_path, "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    atomic_write_json(run_dir / SIMULATION_FILE, {"sites": sites})
    if run.canaries > 0:
        _write_canaries(run, run_dir)

    env = dict(os.environ)
    env["FLWR_HOME"] = str(run_dir / ".flwr")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superlink
    env.setdefault("RAY_DEDUP_LOGS", "0")
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), "--stream",
           "--run-config", str(config_path),
           "--federation-config", f"num-supernodes={sites} client-resources-num-cpus=1"]
    verb = "resuming" if run.resume else "starting"
    print(f"fedvision: {verb} simulation of {sites} sites, {run.num_server_rounds} rounds, strategy "
          f"{run.strategy}, model {run.model}, DP {'on' if run.dp else 'OFF'} → {run_dir}", flush=True)
    started = time.time()
    database = run_dir / ".flwr" / "local-superlink" / "state.db"
    _stop_stale_local_superlinks(database)
    try:
        with open(run_dir / "flwr.log", "a") as log_file:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    cwd=run_dir)
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                if not quiet and _shown(line):
                    print(line.rstrip(), flush=True)
            code = proc.wait()
    finally:
        # `flwr run` leaves its local SuperLink running for reuse; a later run with another FLWR_HOME would
        # then talk to this one (whose files may be gone). Each simulation owns its SuperLink: stop it.
        for pid, db in _local_superlinks():
            if Path(db) == database:
                _stop(pid)
    record = _read_record(run_dir)
    if code != 0 or record.get("status") != "completed":
        tail = _last_error(run_dir / "flwr.log")
        raise FedVisionError(f"simulation did not complete (flwr exit code {code}{'; ' + tail if tail else ''}); "
                             f"full log: {run_dir / 'flwr.log'}")
    print(f"fedvision: run complete in {time.time() - started:.0f}s: {run_dir / 'global_model.pt'}, "
          f"{run_dir / 'run.json'}", flush=True)
    return run_dir


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, command line) of this machine's processes (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), [a.decode(errors="replace")
                                                for a in (entry / "cmdline").read_bytes().split(b"\0") if a]))
            except OSError:
                continue
    return found


def _local_superlinks() -> list[tuple[int, str]]:
    """(pid, database) of every local simulation SuperLink that `flwr run` started on this machine."""
    return [(pid, args[args.index("--database") + 1]) for pid, args in _processes()
            if any(a.endswith("flower-superlink") for a in args[:2]) and "--simulation" in args
            and "--database" in args]


def _stop_stale_local_superlinks(database: Path) -> None:
    """Stop idle local SuperLinks left by earlier runs; refuse to disturb a simulation that is running."""
    running = [pid for pid, args in _processes() if any(a.endswith("flwr-simulation") for a in args[:2])]
    if running:
        raise ConfigError(f"another simulation is running (flwr-simulation pid {running[0]}); Flower's local "
                          "SuperLink serves one simulation at a time: wait for it to finish or stop it")
    for pid, _ in _local_superlinks():
        _stop(pid)


def _stop(pid: int, timeout: float = 15.0) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def _write_canaries(run: RunConfig, run_dir: Path) -> None:
    """The canary audit's canaries and secret coins (``audit.canary``), written once per run before Flower starts;
    a resumed run keeps the coins its sites already trained with."""
    from fedvision.data.canaries import CANARY_FILE, make_canaries, save_canaries
    from fedvision.site import load_for_run

    path = run_dir / CANARY_FILE
    if run.resume:
        if not path.exists():
            raise ConfigError(f"{path}: missing; a run with canaries resumes only with the coins it started with")
        return
    classes = len(load_for_run(run, run.dataset, "train").classes)
    save_canaries(path, make_canaries(run.canaries, classes, run.channels, run.image_size))


def _check_model(run: RunConfig) -> None:
    """Create the model once here, so a bad name or a DP-incompatible model fails before Flower starts."""
    from fedvision.models import create_model

    try:
        create_model(run.model, 2, in_chans=run.channels, img_size=run.image_size, dp=run.dp)
    except ModelError as e:
        raise ConfigError(f"run config: 'model': {e}") from None


def _shown(line: str) -> bool:
    """fedvision's own log lines from the ServerApp (ClientApp lines come through Ray prefixed by the actor)."""
    return line.startswith("[fedvision")


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return ""


def _read_record(run_dir: Path) -> dict[str, Any]:
    """The run record, or {} when Flower failed before writing one (the caller reports the failure)."""
    from fedvision.federation import RUN_RECORD, read_run_record  # torch: not at `fedvision --help` time

    try:
        return read_run_record(run_dir / RUN_RECORD)
    except DataError:
        return {}


def resume(run_dir: str | Path, rounds: int | None = None) -> Path:
    """Continue an interrupted run from its last checkpoint up to its configured (or ``rounds``) total."""
    run_dir = Path(run_dir).resolve()
    config_path = run_dir / "run-config.toml"
    if not (run_dir / "checkpoint.pt").exists() or not config_path.exists():
        raise ConfigError(f"{run_dir}: nothing to resume (no checkpoint.pt and run-config.toml)")
    values = tomllib.loads(config_path.read_text())
    values["resume"] = True
    if rounds:
        values["num-server-rounds"] = rounds
    sites = json.loads((run_dir / SIMULATION_FILE).read_text())["sites"]
    return simulate(values, sites)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, values parsed as TOML (so numbers and booleans keep their types)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        resume(args.resume, args.rounds)
        return 0
    overrides: dict[str, Any] = {}
    if args.config:
        try:
            overrides.update(tomllib.loads(Path(args.config).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{args.config}: cannot read config ({e})") from None
    overrides.update(parse_overrides(args.set or []))
    if args.rounds:
        overrides["num-server-rounds"] = args.rounds
    if args.out:
        overrides["run-dir"] = args.out
    simulate(overrides, args.sites)
    return 0


# The demo: 3 hospitals with DP on synthetic-derm, each its own acquisition and demographic mix.
DEMO = {"dataset": "synthetic-derm:0", "partitioning": "by:site", "test-dataset": "synthetic-derm:0",
        "model": "fedvision_scatternet", "strategy": "fedavg", "lr": 1.0, "momentum": 0.9, "batch-size": 128,
        "max-grad-norm": 0.25, "epsilon-budget": 8.0, "delta": 1e-5, "noise-std": 0.25, "min-train-nodes": 3,
        "min-available-nodes": 3, "num-server-rounds": 8, "local-epochs": 4}
QUICK_DEMO = {"num-server-rounds": 4, "local-epochs": 3}  # --quick: fewer rounds, about 3 minutes on 2 cores


def demo(out: str | Path, quick: bool = False) -> Path:
    out = Path(out).resolve()
    overrides = {**DEMO, **(QUICK_DEMO if quick else {}), "run-dir": str(out / "run")}
    if (out / "run" / "checkpoint.pt").exists():
        raise ConfigError(f"{out / 'run'} already holds a run: choose another --out or delete it")
    run_dir = simulate(overrides, sites=3)
    # The full audit (robustness, fairness pooled and as the sites computed it, privacy) of the global model on
    # the held-out synthetic test split; --quick certifies and attacks fewer images and runs a smaller
    # membership-inference test to stay within about 3 minutes on 2 cores.
    audit_args = ["audit", "--model", str(run_dir / "global_model.pt"), "--data", DEMO["test-dataset"],
                  "--run", str(run_dir), "--out", str(out / "report")] + \
        (["--limit", "50", "--mia-samples", "200"] if quick else ["--limit", "100"])
    from fedvision.cli import build_parser

    args = build_parser().parse_args(audit_args)
    args.handler(args)
    print(f"fedvision: compliance report written to {out / 'report' / 'report.html'} (machine-readable: "
          f"{out / 'report' / 'report.json'})")
    return run_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a federated simulation through Flower (flwr run)",
                       description="Run a federated simulation through Flower's simulation engine.")
    p.add_argument("--config", help="TOML file of run-config keys (see docs/configuration.md)")
    p.add_argument("--sites", type=int, default=3, help="number of simulated sites (default 3)")
    p.add_argument("--rounds", type=int, help="total rounds (num-server-rounds)")
    p.add_argument("--out", help="run folder (run-dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one run-config key")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(handler=_run)

    d = sub.add_parser("demo", help="the whole flow on bundled data: 3 DP sites, then the audit report")
    d.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    d.add_argument("--quick", action="store_true", help="fewer rounds (about 3 minutes on 2 cores)")
    d.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    demo(args.out, args.quick)
    return 0
