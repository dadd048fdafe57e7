"""The noise-independence check: it passes runs whose noise is what the ledgers say, at its stated false-alarm
rate, and flags shared or missing noise. Updates go through the coordinator's own ``update_geometry``."""

import math

import numpy as np
import pytest
import torch

from audit.mechanism import noise_energy, noise_independence
from fedvision.federation import update_geometry

P, SITES, ROUNDS = 3000, 3, 4
SITE = {"noise-multiplier": 1.2, "sample-rate": 0.25, "steps": 8, "num-examples": 400}
CONFIG = {"dp": True, "strategy": "fedavg", "lr": 0.5, "momentum": 0.9, "max-grad-norm": 1.0}


def _record(rng: np.random.Generator, noise: str = "independent") -> dict:
    energy = noise_energy(noise_multiplier=SITE["noise-multiplier"], max_grad_norm=CONFIG["max-grad-norm"],
                          sample_rate=SITE["sample-rate"], num_examples=SITE["num-examples"], steps=SITE["steps"],
                          lr=CONFIG["lr"], momentum=CONFIG["momentum"], parameters=P)
    std = math.sqrt(energy / P)
    reference = {"w": np.zeros(P, np.float32)}
    rounds = []
    for r in range(1, ROUNDS + 1):
        signal = rng.normal(0, 2 * std, P)  # the data-dependent part: shared direction plus a site's own
        shared = rng.normal(0, std, P)
        updates = {}
        for s in range(SITES):
            own = signal + rng.normal(0, 0.5 * std, P)
            if noise == "independent":
                own += rng.normal(0, std, P)
            elif noise == "shared":  # every site draws the same noise (a public seed)
                own += shared
            elif noise == "half":  # the sites add half the noise their ledgers declare
                own += rng.normal(0, 0.5 * std, P)
            updates[f"site-{s + 1}"] = {"w": own.astype(np.float32)}
        rounds.append({"round": r, "sites": {name: dict(SITE) for name in updates},
                       "updates": update_geometry(reference, updates)})
    return {"config": CONFIG, "trainable_parameters": P, "rounds": rounds}


def test_correct_runs_pass_at_the_stated_false_alarm_rate():
    rng = np.random.default_rng(0)
    alpha, trials = 0.05, 60
    alarms = sum(not noise_independence(_record(rng), alpha=alpha)["passed"] for _ in range(trials))
    # Bonferroni makes the test conservative: at most α of the runs, with a binomial margin of 3 sd.
    assert alarms <= alpha * trials + 3 * math.sqrt(trials * alpha * (1 - alpha)), alarms


@pytest.mark.parametrize("noise", ["shared", "half"])
def test_shared_or_missing_noise_is_flagged(noise):
    rng = np.random.default_rng(1)
    for _ in range(10):
        result = noise_independence(_record(rng, noise))
        assert result["assessed"] and not result["passed"] and result["flagged"]
        assert result["min_statistic"] < result["threshold"]


def test_no_check_without_what_it_needs():
    rng = np.random.default_rng(2)
    record = _record(rng)
    assert noise_independence({**record, "config": {**CONFIG, "dp": False}})["assessed"] is False
    assert noise_independence({**record, "trainable_parameters": None})["assessed"] is False
    assert noise_independence({**record, "config": {**CONFIG, "strategy": "fedprox"}})["assessed"] is False


def test_noise_energy_matches_real_dp_sgd_with_momentum(tmp_path):
    """The energy the check expects is what Opacus really adds: two trainings from the same weights, same data
    and same config differ by √(2v) when σ is large enough that noise dominates the update."""
    from fedvision.models import create_model
    from fedvision.train import TrainConfig, train_private

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, noise_multiplier=20.0, max_grad_norm=1.0,
                      device="cpu")
    finals = []
    for _ in range(2):
        torch.manual_seed(5)
        model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
        train_private(model, data, cfg)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    parameters = finals[0].numel()
    energy = noise_energy(noise_multiplier=20.0, max_grad_norm=1.0, sample_rate=0.25, num_examples=64, steps=8,
                          lr=0.05, momentum=0.9, parameters=parameters)
    distance = float((finals[0] - finals[1]).norm())
    assert 0.7 * math.sqrt(2 * energy) <= distance <= 1.3 * math.sqrt(2 * energy), (distance, math.sqrt(2 * energy))
