"""Privacy accounting: the PLD accountant every ledger is enforced with, against an independent dp-accounting
computation; RDP beside it as a cross-check; σ calibration with the same accountant."""

import math
import random

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import RDPAccountant

from fedvision.dp import (ACCOUNTANT, ACCOUNTANTS, CROSS_CHECK_ACCOUNTANT, epsilon_of, epsilon_pld, epsilon_rdp,
                          epsilons, noise_for_budget)
from fedvision.errors import ConfigError
from fedvision.privacy import PrivacyLedger

DELTA = 1e-5


def _independent_pld(history, delta, interval=1e-3, pessimistic=True):
    """ε from dp-accounting's own PLDAccountant and DpEvents, entry by entry, with its own discretization."""
    if pessimistic:
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        for sigma, q, steps in history:
            event = dp_event.GaussianDpEvent(sigma)
            accountant.compose(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event), steps)
        return accountant.get_epsilon(delta)
    # The optimistic discretization: a lower estimate of the exact ε, so a sound value is never below it.
    from dp_accounting.pld import privacy_loss_distribution as pld
    composed = None
    for sigma, q, steps in history:
        g = pld.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=interval,
                                        pessimistic_estimate=False).self_compose(steps)
        composed = g if composed is None else composed.compose(g)
    return composed.get_epsilon_for_delta(delta)


def test_ledger_epsilon_matches_an_independent_pld_computation(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    charges = [(1.1, 0.05, 120), (1.1, 0.05, 120), (1.1, 0.05, 120), (0.9, 0.02, 300), (1.5, 0.25, 40)]
    for sigma, q, steps in charges:
        ledger.charge(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    independent = _independent_pld(charges, DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(independent, rel=0.01)
    # Sound: never below dp-accounting's optimistic (lower) estimate of the exact ε.
    assert ledger.epsilon(DELTA) >= _independent_pld(charges, DELTA, pessimistic=False)
    # A reloaded ledger composes the same history to the same value.
    assert PrivacyLedger(tmp_path / "ledger.json").epsilon(DELTA) == ledger.epsilon(DELTA)
    summary = ledger.summary(DELTA)
    assert summary["accountant"] == ACCOUNTANT == "pld" and summary["cross_check_accountant"] == "rdp"
    assert summary["epsilon"] == ledger.epsilon(DELTA)
    assert summary["epsilon_rdp"] == pytest.approx(epsilon_rdp(charges, DELTA), rel=1e-12)
    assert summary["epsilon"] < summary["epsilon_rdp"]


def test_reference_ledger_pld_rdp_and_calibration():
    # The demo's ledger: q = 0.25, σ = 2.016, 128 steps, δ = 1e-5 (measured: RDP 7.967, PLD 7.324).
    history = [(2.016, 0.25, 128)]
    assert epsilon_of(history, DELTA) == pytest.approx(7.324, rel=0.01)
    assert epsilon_of(history, DELTA, "rdp") == pytest.approx(7.967, rel=0.001)
    assert epsilons(history, DELTA) == {"pld": epsilon_pld(history, DELTA), "rdp": epsilon_rdp(history, DELTA)}
    assert list(epsilons(history, DELTA)) == list(ACCOUNTANTS) == [ACCOUNTANT, CROSS_CHECK_ACCOUNTANT]
    # For ε = 8 the PLD accountant allows σ ≈ 1.890, about 6 % less noise than RDP would.
    sigma = noise_for_budget(8.0, DELTA, 0.25, 128)
    assert sigma == pytest.approx(1.890, rel=0.02)
    assert epsilon_of([(sigma / 0.96, 0.25, 128)], DELTA, "rdp") > 8.0


@pytest.mark.parametrize("history", [
    [(1.0, 0.01, 1000)],
    [(0.8, 0.05, 500), (1.2, 0.05, 500)],
    [(2.0, 0.25, 64)] * 3 + [(10.0, 1.0, 2)],  # with a plain Gaussian release (noisy counts)
    [(0.6, 0.25, 100)],
])
def test_pld_is_within_1_percent_of_dp_accounting_and_below_rdp(history):
    pld_eps = epsilon_of(history, DELTA)
    assert pld_eps == pytest.approx(_independent_pld(history, DELTA), rel=0.01)
    assert pld_eps <= epsilon_rdp(history, DELTA)


def test_rdp_cross_check_equals_one_opacus_accountant_fed_every_step():
    history = [(1.1, 0.05, 30), (0.8, 0.02, 12), (1.1, 0.05, 7)]
    reference = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_rdp(history, DELTA) == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-9)


@pytest.mark.parametrize("budget, q, steps, history", [
    (8.0, 0.01, 500, []),
    (3.0, 0.25, 128, []),
    (2.0, 1.0, 5, []),
    (6.0, 0.05, 200, [(1.3, 0.05, 200), (10.0, 1.0, 1)]),
])
def test_calibrated_noise_is_the_smallest_within_budget(budget, q, steps, history):
    sigma = noise_for_budget(budget, DELTA, q, steps, history=history)
    assert epsilon_of(history + [(sigma, q, steps)], DELTA) <= budget
    assert epsilon_of(history + [(sigma * 0.99, q, steps)], DELTA) > budget


def test_no_noise_is_no_privacy_and_nothing_hangs():
    for accountant in ACCOUNTANTS:
        assert epsilon_of([(0.0, 0.25, 10)], DELTA, accountant) == math.inf
        assert epsilon_of([(1.0, 0.01, 100), (0.0, 1.0, 1)], DELTA, accountant) == math.inf
        assert epsilon_of([], DELTA, accountant) == 0.0
        assert epsilon_of([(0.0, 0.25, 0), (1.0, 0.0, 10)], DELTA, accountant) == 0.0  # nothing released
    # A tiny σ (no meaningful privacy) falls back to the RDP bound instead of a PLD of millions of points.
    assert epsilon_of([(1e-4, 0.5, 1000)], DELTA) == epsilon_rdp([(1e-4, 0.5, 1000)], DELTA) > 1e9
    assert noise_for_budget(1.0, DELTA, 0.25, 0) == 0.0  # no steps: nothing to calibrate
    with pytest.raises(ValueError, match="invalid privacy history"):
        epsilon_of([(-1.0, 0.1, 10)], DELTA)
    with pytest.raises(ConfigError, match="accountant"):
        epsilon_of([(1.0, 0.1, 10)], DELTA, "prv")


def test_heterogeneous_entries_compose_in_any_order():
    history = [(1.1, 0.05, 100), (0.9, 0.02, 250), (1.1, 0.05, 50), (3.0, 1.0, 1), (2.0, 0.25, 20)]
    shuffled = history[:]
    random.Random(0).shuffle(shuffled)
    for accountant in ACCOUNTANTS:
        eps = epsilon_of(history, DELTA, accountant)
        assert epsilon_of(shuffled, DELTA, accountant) == eps
        assert epsilon_of(history[::-1], DELTA, accountant) == eps
        merged = [(1.1, 0.05, 150)] + [e for e in history if e[:2] != (1.1, 0.05)]
        assert epsilon_of(merged, DELTA, accountant) == eps
        assert eps > max(epsilon_of([e], DELTA, accountant) for e in history)
