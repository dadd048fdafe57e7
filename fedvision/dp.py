"""The one place that talks to Opacus: DP-SGD components (Poisson sampling and noise, with fresh secret
randomness; per-sample clipping is fedvision.per_sample's own) and privacy accounting (PLD from dp-accounting,
enforced; RDP from Opacus, as a cross-check).

Everything else (training loop, privacy ledger, model factory) calls these functions, so an Opacus
upgrade or a change of accountant touches this file only.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from fedvision.errors import BudgetExceededError, ConfigError, ModelError

# torch.func (fedvision.per_sample's route for parameters without a closed form, e.g. ViT's class token) has no
# batching rule for CPU flash attention: per-sample gradients are right, only slower; the warning would repeat.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")

# The accountant every ledger is composed and enforced with, and σ calibrated with: the privacy-loss-distribution
# (PLD) accountant of Google's dp-accounting, with pessimistic discretization (a sound upper bound, within a few
# thousandths of the exact ε). RDP (Opacus's RDPAccountant, looser) is computed beside it as a cross-check.
# (Opacus's PRV can fail with "Discrete mean differs"; dp-accounting's PLD is robust.)
ACCOUNTANT = "pld"
CROSS_CHECK_ACCOUNTANT = "rdp"
ACCOUNTANTS = (ACCOUNTANT, CROSS_CHECK_ACCOUNTANT)

# One history entry: (noise_multiplier, sample_rate, steps), the format of Opacus's RDPAccountant.history:
# ``steps`` Poisson-subsampled Gaussian releases (add/remove-one adjacency, L2 sensitivity 1 after clipping).
# sample_rate 1.0 is a plain Gaussian release (e.g. noisy counts, σ relative to their L2 sensitivity);
# noise_multiplier 0 is a release without privacy (ε = ∞).
HistoryEntry = tuple[float, float, int]

# PLD discretization. The pessimistic grid overestimates ε by at most about steps · interval² / 2 (measured on
# q 0.01–0.25, σ 0.6–2, up to 3,000 steps), so the interval is chosen per history to keep that near
# PLD_EPSILON_SLACK (rounded down to a power of two, so that a growing ledger keeps hitting cached PLDs). Building
# one mechanism's PLD costs 15-30 µs per grid point (dp-accounting inverts the privacy loss point by point) and
# its loss spans about 20/σ; composed n times with sample rate q, about (nq + 8√(nq) + 2) such spans when σ is
# small (the loss is large only on the steps that sample the record). A small σ (no meaningful privacy: ε in the
# tens to thousands) therefore gets a coarser grid, at most _PLD_MAX_POINTS points per mechanism and about
# _PLD_MAX_COMPOSED_POINTS composed: looser, still sound, and no history takes long.
PLD_EPSILON_SLACK = 6e-3
_PLD_INTERVAL_MIN, _PLD_INTERVAL_MAX = 2.0 ** -14, 2.0 ** -4
_PLD_MAX_POINTS, _PLD_MAX_COMPOSED_POINTS = 20_000, 4_000_000
# Below this effective noise multiplier (σ, or σ/√steps at sample rate 1) dp-accounting's PLD construction takes
# seconds to minutes whatever the grid; such a history's ε (hundreds and more: no privacy to speak of) is the RDP
# bound, also sound, and no smaller than the PLD one, so ε stays decreasing in σ.
PLD_MIN_NOISE = 0.2


# ---------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------
def validate_delta(delta: float) -> float:
    if not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0 or math.isnan(delta):
        raise ConfigError(f"delta must lie strictly between 0 and 1, got {delta!r}")
    return float(delta)


def validate_epsilon(epsilon: float, field: str = "epsilon") -> float:
    if not isinstance(epsilon, (int, float)) or not float(epsilon) > 0 or math.isinf(epsilon):
        raise ConfigError(f"{field} must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _validate_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return accountant


def _grouped(history: Sequence[HistoryEntry]) -> tuple[tuple[float, float, int], ...] | None:
    """``history`` validated, with releases that cost nothing dropped (no steps, sample rate 0, infinite noise)
    and entries of equal (σ, q) merged, sorted: composition does not depend on order. None when some release
    has no noise at all (ε = ∞)."""
    merged: dict[tuple[float, float], int] = {}
    no_noise = False
    for entry in history:
        sigma, q, steps = entry
        sigma, q = float(sigma), float(q)
        if int(steps) != steps or not (sigma >= 0 and 0 <= q <= 1 and steps >= 0):  # also refuses NaN
            raise ValueError(f"invalid privacy history entry: σ={sigma!r}, q={q!r}, steps={steps!r}")
        steps = int(steps)
        if steps == 0 or q == 0 or math.isinf(sigma):
            continue
        if sigma == 0:
            no_noise = True
            continue
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    if no_noise:
        return None
    return tuple(sorted((sigma, q, steps) for (sigma, q), steps in merged.items()))


def _prepared(history: Sequence[HistoryEntry], delta: float) -> tuple[tuple[float, float, int], ...] | float:
    """Validated, grouped ``history`` for an accountant, or its ε outright when there is nothing to compose:
    ∞ when a release had no noise, 0 when no release cost anything."""
    validate_delta(delta)
    groups = _grouped(history)
    if groups is None:
        return math.inf
    return groups if groups else 0.0


def _effective_noise(sigma: float, q: float, steps: int) -> float:
    return sigma / math.sqrt(steps) if q >= 1 else sigma  # n Gaussian releases are one with σ/√n


def pld_discretization(history: Sequence[HistoryEntry]) -> float:
    """The PLD accountant's value discretization interval for ``history`` (see PLD_EPSILON_SLACK)."""
    groups = _grouped(history) or ()
    compositions = sum(1 if q >= 1 else n for _, q, n in groups)
    precise = math.sqrt(2 * PLD_EPSILON_SLACK / max(compositions, 1))
    interval = 2.0 ** math.floor(math.log2(min(max(precise, _PLD_INTERVAL_MIN), _PLD_INTERVAL_MAX)))
    for sigma, q, n in groups:
        width = 20.0 / _effective_noise(sigma, q, n)
        spans = 1.0 if q >= 1 else min(n, n * q + 8 * math.sqrt(n * q) + 2)
        coarsest = max(width / _PLD_MAX_POINTS, spans * width / _PLD_MAX_COMPOSED_POINTS)
        if coarsest > interval:
            interval = 2.0 ** math.ceil(math.log2(coarsest))
    return interval


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian_pld(sigma: float, q: float, interval: float):
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(standard_deviation=sigma, sampling_prob=q, value_discretization_interval=interval,
                                       pessimistic_estimate=True,
                                       neighboring_relation=pld.NeighborRel.ADD_OR_REMOVE_ONE)


@functools.lru_cache(maxsize=64)
def _group_pld(sigma: float, q: float, steps: int, interval: float):
    """PLD of ``steps`` releases at (σ, q), pessimistic: self_compose truncates tails into the ∞ mass."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    if q >= 1:  # `steps` Gaussian releases are exactly one Gaussian release with σ/√steps
        return pld.from_gaussian_mechanism(standard_deviation=sigma / math.sqrt(steps),
                                           value_discretization_interval=interval, pessimistic_estimate=True,
                                           neighboring_relation=pld.NeighborRel.ADD_OR_REMOVE_ONE)
    return _subsampled_gaussian_pld(sigma, q, interval).self_compose(steps)


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(groups: tuple[tuple[float, float, int], ...], delta: float, interval: float) -> float:
    composed = None
    for group in groups:
        g = _group_pld(*group, interval)
        composed = g if composed is None else composed.compose(g)
    return float(composed.get_epsilon_for_delta(delta))


def epsilon_pld(history: Sequence[HistoryEntry], delta: float, interval: float | None = None) -> float:
    """ε(δ) of the composition of ``history`` under dp-accounting's PLD accountant (pessimistic, hence sound).

    ``interval`` overrides the value discretization interval (default: ``pld_discretization(history)``). A
    history with a release below PLD_MIN_NOISE gets the RDP bound instead."""
    groups = _prepared(history, delta)
    if not isinstance(groups, tuple):
        return groups
    if any(_effective_noise(*group) < PLD_MIN_NOISE for group in groups):
        return epsilon_rdp(groups, delta)
    return _pld_epsilon(groups, float(delta), float(interval or pld_discretization(groups)))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False
    return rdp


def epsilon_rdp(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε(δ) of ``history`` under Opacus's RDP accountant (its RDPAccountant's orders and conversion): the
    cross-check. Equal, up to float summation order, to one RDPAccountant fed every step."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    groups = _prepared(history, delta)
    if not isinstance(groups, tuple):
        return groups
    rdp = sum(_rdp_per_step(sigma, q) * steps for sigma, q, steps in groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal alpha at the edge of its grid
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


_EPSILON_FUNCTIONS = {"pld": epsilon_pld, "rdp": epsilon_rdp}


def epsilon_of(history: Sequence[HistoryEntry], delta: float, accountant: str = ACCOUNTANT) -> float:
    """ε(δ) of the composition of every entry in ``history``: under the PLD accountant (the one enforced), or
    under ``accountant="rdp"`` for the cross-check. 0 for an empty history, ∞ if some release had σ = 0."""
    return _EPSILON_FUNCTIONS[_validate_accountant(accountant)](history, delta)


def epsilons(history: Sequence[HistoryEntry], delta: float) -> dict[str, float]:
    """ε(δ) of ``history`` under every accountant, the enforced one first: {"pld": …, "rdp": …}."""
    return {name: epsilon_of(history, delta, name) for name in ACCOUNTANTS}


def noise_for_budget(epsilon_budget: float, delta: float, sample_rate: float, steps: int,
                     max_noise_multiplier: float = 1e3, tolerance: float = 0.005,
                     history: Sequence[HistoryEntry] = (), accountant: str = ACCOUNTANT) -> float:
    """Smallest noise multiplier σ (to ``tolerance``) for which ``steps`` steps at ``sample_rate``, composed after
    ``history``, stay within ``epsilon_budget`` at ``delta`` under ``accountant`` (the enforced PLD by default).
    The σ returned was itself checked to be within budget, and σ·(1 - tolerance) to be over it. Raises
    BudgetExceededError if that needs more than ``max_noise_multiplier``.
    """
    validate_epsilon(epsilon_budget, "epsilon budget")
    validate_delta(delta)
    _validate_accountant(accountant)
    history = list(history)

    def eps(sigma: float) -> float:
        return epsilon_of(history + [(sigma, sample_rate, steps)], delta, accountant)

    def eps_coarse(sigma: float) -> float:  # PLD on a 4x coarser grid (4x fewer points): σ to within ~1 %
        h = history + [(sigma, sample_rate, steps)]
        return epsilon_pld(h, delta, interval=4 * pld_discretization(h)) if accountant == "pld" else eps(sigma)

    if eps(max_noise_multiplier) > epsilon_budget:
        raise BudgetExceededError(
            f"privacy budget ε={epsilon_budget:g} at δ={delta:g} is too small for {steps} steps at sample rate "
            f"{sample_rate:.3g}: it would need a noise multiplier above {max_noise_multiplier:g}")
    if eps(0.0) <= epsilon_budget:  # these steps cost nothing (no steps, or sample rate 0)
        return 0.0
    rough = _calibrate(eps_coarse, epsilon_budget, 1.0, 1.0, max_noise_multiplier, tolerance)
    return _calibrate(eps, epsilon_budget, rough, 4 * tolerance, max_noise_multiplier, tolerance)


def _calibrate(eps, budget: float, guess: float, step: float, max_sigma: float, tolerance: float) -> float:
    """The smallest σ with eps(σ) <= budget, to ``tolerance``: brackets lo < hi with eps(lo) > budget >= eps(hi),
    walking from ``guess`` by factors 1 + step (step doubling at each move), then narrows the bracket by
    interpolating log ε against log σ (Illinois regula falsi: ε is close to a power of σ) until
    hi - lo <= tolerance * hi, and returns hi. Needs eps decreasing, eps(max_sigma) <= budget < eps(0)."""
    hi = min(guess, max_sigma)
    e_hi = eps(hi)
    if e_hi > budget:
        lo, e_lo = hi, e_hi
        while True:
            hi = min(lo * (1 + step), max_sigma)
            e_hi = eps(hi)
            if e_hi <= budget:
                break
            lo, e_lo, step = hi, e_hi, step * 2
    else:
        while True:
            lo = hi / (1 + step)
            e_lo = eps(lo)
            if e_lo > budget:
                break
            hi, e_hi, step = lo, e_lo, step * 2
    g_lo, g_hi = math.log(e_lo / budget), math.log(e_hi / budget) if e_hi > 0 else -math.inf
    moved = 0  # which end moved last: -1 lo, +1 hi
    while hi - lo > tolerance * hi:
        if math.isfinite(g_lo) and math.isfinite(g_hi):
            sigma = lo * (hi / lo) ** (g_lo / (g_lo - g_hi))
            margin = tolerance * hi / 4  # strictly inside, so that both ends keep moving
            sigma = min(max(sigma, lo + margin), hi - margin)
        else:
            sigma = (lo + hi) / 2
        e = eps(sigma)
        if e > budget:
            lo, g_lo = sigma, math.log(e / budget)
            g_hi = g_hi / 2 if moved == -1 else g_hi  # Illinois: the end that stays still counts less
            moved = -1
        else:
            hi, g_hi = sigma, math.log(e / budget) if e > 0 else -math.inf
            g_lo = g_lo / 2 if moved == 1 else g_lo
            moved = 1
    return hi


# ---------------------------------------------------------------------------------------------------------
# Per-sample gradients (fedvision.per_sample: book-keeping clipping, one backward pass)
# ---------------------------------------------------------------------------------------------------------
def check_per_sample_gradients(model: nn.Module, input_shape: tuple[int, int, int], name: str = "model") -> None:
    """Run one clipped backward pass on two random inputs; raise ModelError (one line) if a layer cannot give
    per-sample gradients."""
    from fedvision.per_sample import PerSampleClipper

    was_training = model.training
    clipper = None
    try:
        model.train()
        clipper = PerSampleClipper(model)
        out = clipper(torch.rand(2, *input_shape))
        clipper.clipped_backward(out.float().reshape(2, -1).sum(1), 1.0)
        for pname, p in model.named_parameters():
            if p.requires_grad and (p.grad is None or p.grad.shape != p.shape):
                raise ModelError(f"model '{name}' cannot be trained with DP-SGD: no per-sample gradient "
                                 f"for parameter '{pname}'")
    except ModelError as e:
        raise ModelError(str(e) if str(e).startswith(f"model '{name}'") else
                         f"model '{name}' cannot be trained with DP-SGD: {e}") from e
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"model '{name}' cannot be trained with DP-SGD: {reason}") from e
    finally:
        if clipper is not None:
            clipper.close()
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


@dataclass(frozen=True)
class PrivateRandomness:
    """The randomness that makes DP-SGD private: Poisson sampling and Gaussian noise.

    The adversary (the coordinator and every other site) knows the code and every config, so this randomness
    must be secret and fresh: ``secret()`` seeds both generators from the operating system's entropy pool for
    every training, and the noise is drawn in Opacus's secure mode (a sum of four Gaussians, against the
    floating-point attacks of Mironov 2012 and Jin et al. 2022). ``seeded(seed)`` exists for tests that need
    bit-identical trainings only: anyone who knows the seed can regenerate every batch and every noise draw
    and subtract them, so such a training is not private, and its ledger entry says so.
    """

    sampling: torch.Generator  # Poisson sampling of each logical batch
    noise: torch.Generator  # Gaussian noise added to the clipped gradient sum
    source: str  # recorded in the ledger: SECRET_SOURCE, or SEEDED_SOURCE for tests

    @classmethod
    def secret(cls, device: torch.device | str = "cpu") -> "PrivateRandomness":
        return cls(_generator("cpu", secrets.randbits(64)), _generator(device, secrets.randbits(64)), SECRET_SOURCE)

    @classmethod
    def seeded(cls, seed: int, device: torch.device | str = "cpu") -> "PrivateRandomness":
        return cls(_generator("cpu", seed), _generator(device, seed + 1), SEEDED_SOURCE)

    @property
    def private(self) -> bool:
        return self.source == SECRET_SOURCE

    def gaussian(self, std: float, shape: tuple[int, ...]) -> torch.Tensor:
        """Gaussian noise N(0, std²) in float64 from the noise generator, drawn the way DP-SGD's noise is (Opacus's
        secure mode unless seeded): for DP releases other than training, such as noisy evaluation counts."""
        from opacus.optimizers.optimizer import _generate_noise

        reference = torch.zeros(shape, dtype=torch.float64, device=self.noise.device)
        return _generate_noise(std, reference, generator=self.noise, secure_mode=self.private).double().cpu()


SECRET_SOURCE = "os-entropy"  # fresh 64-bit seeds from the OS's CSPRNG per training; secure-mode noise
SEEDED_SOURCE = "seeded-test-only"  # reproducible, therefore NOT private


def _generator(device: torch.device | str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: torch.utils.data.DataLoader,
                 noise_multiplier: float, max_grad_norm: float, randomness: PrivateRandomness):
    """Wrap model, optimizer and loader for DP-SGD: Poisson sampling and flat per-sample clipping.

    Returns (clipper, dp_optimizer, dp_data_loader, sample_rate). The clipper (``fedvision.per_sample``) turns
    per-sample losses into the clipped gradient sum in ``.grad``; Opacus's optimizer adds the Gaussian noise
    (std σ·C) to the sum over a logical batch, divides by the expected batch size and steps. Accounting is not
    done here: the caller charges (noise_multiplier, sample_rate, steps) to the site's ``PrivacyLedger`` first.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedvision.per_sample import PerSampleClipper

    # Poisson batches from the secret sampling generator (Opacus's secure_rng would need torchcsprng,
    # unmaintained since torch 1.x).
    loader = DPDataLoader.from_data_loader(data_loader, generator=randomness.sampling)
    sample_rate = 1.0 / len(loader)
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(len(data_loader.dataset) * sample_rate), loss_reduction="mean",
        generator=randomness.noise,
        # Secure-mode noise (a sum of four Gaussians, Opacus's _generate_noise) with our generator.
        secure_mode=randomness.private)
    return PerSampleClipper(model), dp_optimizer, loader, sample_rate


def memory_safe_batches(data_loader, max_physical_batch_size: int, optimizer):
    """Opacus's BatchMemoryManager: logical (Poisson) batches split into physical ones that fit memory."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    return BatchMemoryManager(data_loader=data_loader, max_physical_batch_size=max_physical_batch_size,
                              optimizer=optimizer)


def release(clipper) -> None:
    """Remove the per-sample clipper's hooks from the model."""
    clipper.close()
