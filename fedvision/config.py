"""The one config schema: run config (coordinator and simulation) and node config (a site).

Flower passes run config from ``[tool.flwr.app.config]`` (plus ``--run-config`` overrides) and node config
from ``flower-supernode --node-config``; the CLI writes the same keys. Keys use Flower's hyphenated style.
Every key is declared once here with its type, default, check and meaning; an unknown key or a bad value
raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from fedvision.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum")


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0 < v <= 1


def _open_unit(v: Any) -> bool:
    return 0 < v < 1


def _opt(help: str, default: Any, check: Callable[[Any], bool] | None = None, what: str = "",
         choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "check": check, "what": what, "choices": choices})


# Simulated attacks (``simulated-attacks``): on the weights (``fedvision.site.poison``) and on the reply itself
# (a wrong example count, a key outside the schema, a malformed evaluation payload).
WEIGHT_ATTACKS = ("nan", "scale", "signflip", "noise")
REPLY_ATTACKS = ("claim", "extra", "badeval")


@dataclass(frozen=True)
class RunConfig:
    """Run config of a federation run. Attribute ``num_server_rounds`` is key ``num-server-rounds``."""

    # -- federation ----------------------------------------------------------------------------------------
    num_server_rounds: int = _opt("rounds in total (a resumed run continues up to this)", 3, _positive, "≥ 1")
    strategy: str = _opt("aggregation rule", "fedavg", choices=STRATEGIES)
    fraction_train: float = _opt("fraction of connected sites sampled per round", 1.0, _fraction, "in (0, 1]")
    min_train_nodes: int = _opt("a round goes on once this many sites replied", 2, _positive, "≥ 1")
    min_available_nodes: int = _opt("sites that must be connected before a round starts", 2, _positive, "≥ 1")
    round_timeout: float = _opt("seconds to wait for replies in a round", 600.0, _positive, "> 0")
    proximal_mu: float = _opt("FedProx proximal strength μ", 0.01, _non_negative, "≥ 0")
    server_lr: float = _opt("FedAdam server learning rate η", 0.01, _positive, "> 0")
    trimmed_beta: float = _opt("FedTrimmedAvg: fraction trimmed at each end", 0.2, lambda v: 0 <= v < 0.5,
                               "in [0, 0.5)")
    krum_malicious: int = _opt("Krum/MultiKrum: number of malicious sites tolerated", 1, _non_negative, "≥ 0")
    multikrum_keep: int = _opt("MultiKrum: updates kept for averaging (0 = all but the malicious)", 0,
                               _non_negative, "≥ 0")
    max_update_norm: float = _opt("reject updates whose L2 distance to the global model exceeds this (0 = off)",
                                  100.0, _non_negative, "≥ 0")
    max_norm_ratio: float = _opt("reject updates whose norm exceeds this multiple of the round's median "
                                 "(needs ≥ 3 updates; 0 = off)", 10.0, _non_negative, "≥ 0")
    max_weight_ratio: float = _opt("weighted rules (FedAvg, FedProx, FedAdam): no site's weight exceeds this "
                                   "multiple of the round's median num-examples (0 = off)", 4.0, _non_negative, "≥ 0")
    # -- model and data ------------------------------------------------------------------------------------
    model: str = _opt("timm model name or fedvision_cnn / fedvision_scatternet / fedvision_swin", "fedvision_cnn")
    image_size: int = _opt("images are resized to image-size × image-size", 32, lambda v: v >= 4, "≥ 4")
    channels: int = _opt("image channels (1 or 3)", 3, lambda v: v in (1, 3), "1 or 3")
    dataset: str = _opt("simulation: the dataset spec partitioned among simulated sites", "synthetic-derm:0")
    partitioning: str = _opt("simulation: iid, dirichlet:ALPHA or by:COLUMN", "by:site")
    classes: str = _opt("comma-separated class names in label order ('' = from the data); set it when sites "
                         "read their own manifests, so every site maps labels to the same indices", "")
    test_dataset: str = _opt("held-out data for central evaluation each round ('' = none)", "")
    local_test_fraction: float = _opt("share of a site's data held out for its local evaluation", 0.2,
                                      lambda v: 0 <= v < 1, "in [0, 1)")
    sensitive: str = _opt("comma-separated sensitive attributes reported per group", "sex,age_band,skin_tone,site")
    # -- local training ------------------------------------------------------------------------------------
    local_epochs: int = _opt("local epochs per round", 1, _positive, "≥ 1")
    batch_size: int = _opt("expected logical batch size (Poisson sampling)", 64, _positive, "≥ 1")
    max_physical_batch_size: int = _opt("memory bound on a physical batch", 128, _positive, "≥ 1")
    lr: float = _opt("local learning rate", 0.1, _positive, "> 0")
    momentum: float = _opt("local SGD momentum", 0.0, lambda v: 0 <= v < 1, "in [0, 1)")
    dp: bool = _opt("train with DP-SGD (false only in simulation, for debugging: no privacy guarantee; a deployed "
                    "site refuses it)", True)
    max_grad_norm: float = _opt("DP-SGD per-sample clipping bound", 1.0, _positive, "> 0")
    epsilon_budget: float = _opt("ε a site may spend on its training records in this run (simulation: each "
                                 "simulated site's whole budget); a deployed site spends at most its own run-epsilon",
                                 8.0, lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
    delta: float = _opt("δ of this run (simulation: each simulated site's δ); a deployed site refuses a δ above "
                        "its own", 1e-5, _open_unit, "in (0, 1)")
    noise_multiplier: float = _opt("DP-SGD noise multiplier σ (0 = calibrated from the ε allotment over the run's "
                                   "steps); a deployed site refuses a σ below its own floor", 0.0, _non_negative, "≥ 0")
    evaluation_epsilon: float = _opt("simulation: ε each simulated site may spend per run on its local evaluation "
                                     "records (noisy per-group counts)", 1.0,
                                     lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
    exact_evaluation: bool = _opt("simulation: sites release exact evaluation counts (not private; the report "
                                  "says so)", False)
    noise_std: float = _opt("Gaussian noise augmentation σ on inputs (for certification)", 0.0, _non_negative,
                            "≥ 0")
    seed: int = _opt("public seed for data partitioning, local splits, model initialisation and augmentation; "
                     "DP noise and sampling never use it (fresh OS entropy at every training)", 0, _non_negative, "≥ 0")
    # -- simulation only -----------------------------------------------------------------------------------
    site_epsilon_budgets: str = _opt("simulation: comma-separated ε budget per partition ('' = the default)", "")
    simulated_attacks: str = _opt("simulation only (tests and demos): poisoned sites, e.g. 'site-2:nan,site-3:scale=100,site-4:signflip'; "
                                  "reply attacks: claim=N (examples), extra (metric key), badeval (table shape)"
                                  "; 'site-4:nan/scale=100/signflip' rotates through the attacks round by round",
                                  "")
    insecure_shared_dp_seed: int = _opt("simulation only, a test hook for the privacy audit: every simulated site "
                                        "seeds its DP noise and sampling with this value (-1 = off). NOT private: "
                                        "the ledgers, run.json and the report say so; a deployed site refuses it",
                                        -1, lambda v: v >= -1, "≥ -1")
    canaries: int = _opt("simulation only, a test hook for the privacy audit: this many canaries (noise images with "
                         "random labels), each added to site-1's training data by a secret fair coin, for the one-run "
                         "canary audit (0 = off); a deployed site refuses it", 0, _non_negative, "≥ 0")
    # -- bookkeeping (set by the CLI) ----------------------------------------------------------------------
    run_dir: str = _opt("folder for checkpoints, run.json and (in simulation) site state", "fedvision-run")
    resume: bool = _opt("continue from the last checkpoint in run-dir", False)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        return _build(cls, values, "run config")

    def to_mapping(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def class_names(self) -> tuple[str, ...] | None:
        names = tuple(s.strip() for s in self.classes.split(",") if s.strip())
        if names and len(names) < 2:
            raise ConfigError("run config: 'classes' needs at least two class names")
        return names or None

    @property
    def sensitive_attributes(self) -> list[str]:
        return [s.strip() for s in self.sensitive.split(",") if s.strip()]

    def site_budget(self, partition_id: int) -> float:
        """The ε budget of simulated site ``partition_id``."""
        if not self.site_epsilon_budgets:
            return self.epsilon_budget
        budgets = _parse_list(self.site_epsilon_budgets, "site-epsilon-budgets", float)
        if partition_id >= len(budgets):
            return self.epsilon_budget
        if not budgets[partition_id] > 0:
            raise ConfigError(f"site-epsilon-budgets: entry {partition_id + 1} must be > 0")
        return budgets[partition_id]

    def attacks(self) -> dict[str, str]:
        """``simulated-attacks`` as {site name: [attack of round 1, of round 2, …]} (the list repeats)."""
        out = {}
        for item in filter(None, (s.strip() for s in self.simulated_attacks.split(","))):
            site, _, rotation = item.partition(":")
            attacks = rotation.split("/")
            for attack in attacks:
                kind, _, arg = attack.partition("=")
                if kind not in WEIGHT_ATTACKS + REPLY_ATTACKS \
                        or (arg and not _is_number(arg)) or (kind == "claim" and not arg):
                    raise ConfigError(f"simulated-attacks: unknown attack {attack!r} for {site!r} (expected nan, "
                                      "scale=K, signflip, noise=STD, claim=N, extra or badeval)")
            out[site] = attacks
        return out


@dataclass(frozen=True)
class NodeConfig:
    """Node config of a site (``flower-supernode --node-config "data=... state-dir=..."``)."""

    data: str = _opt("the site's training data spec, e.g. manifest:/data/site.csv", "")
    test_data: str = _opt("the site's local evaluation data ('' = hold out local-test-fraction of data)", "")
    state_dir: str = _opt("folder for the site's privacy ledger and round cache", "")
    site_name: str = _opt("the site's name in reports ('' = derived from state-dir)", "")
    # -- the site's privacy policy (a deployed site always trains with DP; a run may only ask for stricter) --
    epsilon_budget: float = _opt("required: the site's lifetime ε budget, for its training records and, "
                                 "separately, for its local evaluation records", 0.0,
                                 lambda v: v >= 0 and math.isfinite(v), "a finite number > 0")
    delta: float = _opt("required: the site's δ, below 1/N for its N records; the site refuses runs asking more",
                        0.0, lambda v: 0 <= v < 1, "in (0, 1)")
    run_epsilon: float = _opt("ε one run may add to the training records (0 = the rest of epsilon-budget); the run's "
                              "own epsilon-budget lowers it", 0.0, lambda v: v >= 0 and math.isfinite(v),
                              "a finite number ≥ 0")
    evaluation_epsilon: float = _opt("ε one run may add to the local evaluation records (noisy per-group counts)",
                                     1.0, lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
    exact_evaluation: bool = _opt("release exact evaluation counts instead (not private; the report names it)", False)
    min_noise_multiplier: float = _opt("floor on the DP-SGD noise multiplier; runs asking less are refused", 0.0,
                                       _non_negative, "≥ 0")
    max_grad_norm: float = _opt("ceiling on the run's max-grad-norm (0 = none); runs asking more are refused", 0.0,
                                _non_negative, "≥ 0")
    # Set by Flower's simulation engine:
    partition_id: int = _opt("simulation: this node's partition", -1)
    num_partitions: int = _opt("simulation: number of partitions", 0)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "NodeConfig":
        return _build(cls, values, "node config")

    @property
    def simulated(self) -> bool:
        return self.partition_id >= 0 and not self.data


def named_split(spec: str, split: str) -> str | None:
    """The split to ask a dataset spec for: only archive-like sources (synthetic-derm, digits, npz) have named
    train/test splits; a site's folder or manifest is read whole."""
    return split if spec.split(":")[0] in ("synthetic-derm", "digits", "npz") else None


def _parse_list(text: str, key: str, convert: Callable[[str], Any]) -> list[Any]:
    try:
        return [convert(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"{key}: cannot parse {text!r} ({e})") from None


def _build(cls, values: Mapping[str, Any], where: str):
    known = {f.name.replace("_", "-"): f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        f = known.get(key) or known.get(str(key).replace("_", "-"))
        if f is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), list(known), n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        kwargs[f.name] = _coerce(f, value, f"{where}: '{f.name.replace('_', '-')}'")
    return cls(**kwargs)


def _coerce(f, value: Any, label: str) -> Any:
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    try:
        if typ is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        else:
            # Flower's TOML parsing turns site-name=7 into a number; anything else that is not text is a mistake.
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError
            value = str(value)
            value.encode("utf-8")  # no lone surrogates: the value ends up in file names, TOML and JSON
            if any(ord(c) < 32 for c in value):
                raise ConfigError(f"{label} must not contain control characters, got {value!r}")
    except (TypeError, ValueError):
        raise ConfigError(f"{label} must be {typ.__name__}, got {value!r}") from None
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{label} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta.get("check") and not meta["check"](value):
        raise ConfigError(f"{label} must be {meta['what']}, got {value!r}")
    return value


def config_reference() -> str:
    """docs/configuration.md's body: both tables (a test checks the file is current)."""
    return f"## Run config\n\n{describe(RunConfig)}\n\n## Node config\n\n{describe(NodeConfig)}\n"


def describe(cls=RunConfig) -> str:
    """Markdown table of every key (for docs and `fedvision run --help-config`)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(cls):
        rows.append(f"| `{f.name.replace('_', '-')}` | `{f.default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
