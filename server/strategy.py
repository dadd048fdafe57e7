"""Strategies by config name, from ``flwr.serverapp.strategy``, and their state for checkpoints."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp import strategy as fl

from fedvision.config import RunConfig


def build_strategy(run: RunConfig) -> fl.Strategy:
    common = dict(fraction_train=run.fraction_train, fraction_evaluate=1.0, min_train_nodes=run.min_train_nodes,
                  min_evaluate_nodes=run.min_train_nodes, min_available_nodes=run.min_available_nodes)
    if run.strategy == "fedavg":
        return fl.FedAvg(**common)
    if run.strategy == "fedprox":
        return fl.FedProx(proximal_mu=run.proximal_mu, **common)
    if run.strategy == "fedadam":
        return fl.FedAdam(eta=run.server_lr, **common)
    if run.strategy == "fedmedian":
        return fl.FedMedian(**common)
    if run.strategy == "fedtrimmedavg":
        return fl.FedTrimmedAvg(beta=run.trimmed_beta, **common)
    if run.strategy == "krum":
        return fl.Krum(num_malicious_nodes=run.krum_malicious, **common)
    if run.strategy == "multikrum":
        keep = run.multikrum_keep or max(1, run.min_train_nodes - run.krum_malicious)
        return fl.MultiKrum(num_malicious_nodes=run.krum_malicious, num_nodes_to_select=keep, **common)
    raise AssertionError(run.strategy)  # RunConfig validated the name


# Adaptive strategies (FedAdam and the other FedOpt variants) keep moment estimates between rounds.
_STATE_ATTRIBUTES = ("m_t", "v_t")


def strategy_state(strategy: fl.Strategy) -> dict[str, Any]:
    state = {}
    for attr in _STATE_ATTRIBUTES:
        value = getattr(strategy, attr, None)
        if value:
            state[attr] = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: fl.Strategy, state: dict[str, Any]) -> None:
    for attr, value in state.items():
        setattr(strategy, attr, {k: v.numpy() for k, v in value.items()})
