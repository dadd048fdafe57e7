"""The one place that talks to Opacus: per-sample gradients, DP-SGD components and RDP accounting.

Everything else (training loop, privacy ledger, model factory) calls these functions, so an Opacus
upgrade or a change of accountant touches this file only.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from fedvision.errors import BudgetExceededError, ConfigError, ModelError

# Opacus hooks the first layer too, whose input (the image) needs no gradient; torch warns about it on every
# backward pass although the per-sample gradients are unaffected.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
# functorch (Opacus's fallback for ViT's class token and position embedding) has no batching rule for CPU flash
# attention: per-sample gradients are right, only slower; the warning would repeat on every step.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")

ACCOUNTANT = "rdp"  # PRV (Opacus's default) can fail with "Discrete mean differs"; RDP is robust and standard.

# One history entry: (noise_multiplier, sample_rate, steps), the format of Opacus's RDPAccountant.history.
HistoryEntry = tuple[float, float, int]


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


def epsilon_of(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε(δ) of the composition of every entry in ``history`` under the RDP accountant."""
    from opacus.accountants import RDPAccountant

    validate_delta(delta)
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal alpha at the edge of its grid
        return float(acc.get_epsilon(delta=delta))


def noise_for_budget(epsilon_budget: float, delta: float, sample_rate: float, steps: int,
                     max_noise_multiplier: float = 1e3, tolerance: float = 0.005) -> float:
    """Smallest noise multiplier σ (to ``tolerance``) for which ``steps`` steps at ``sample_rate`` stay within
    ``epsilon_budget`` at ``delta``. Raises BudgetExceededError if that needs more than ``max_noise_multiplier``.
    """
    validate_epsilon(epsilon_budget, "epsilon budget")
    validate_delta(delta)

    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps)], delta)

    if eps(max_noise_multiplier) > epsilon_budget:
        raise BudgetExceededError(
            f"privacy budget ε={epsilon_budget:g} at δ={delta:g} is too small for {steps} steps at sample rate "
            f"{sample_rate:.3g}: it would need a noise multiplier above {max_noise_multiplier:g}")
    lo, hi = 0.0, 1.0
    while eps(hi) > epsilon_budget:
        lo, hi = hi, min(hi * 2, max_noise_multiplier)
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if eps(mid) > epsilon_budget:
            lo = mid
        else:
            hi = mid
    return hi


# ---------------------------------------------------------------------------------------------------------
# Per-sample gradients
# ---------------------------------------------------------------------------------------------------------
def fold_grad_samples(params: Iterable[nn.Parameter], batch_size: int) -> None:
    """Sum per-sample gradients of layers that saw several rows per image back to one row per image.

    Some models fold pieces of an image into the batch dimension (MobileViT folds its patch positions:
    row ``b * k + j`` belongs to image ``b``). Opacus then returns ``k * B`` gradient rows for those layers,
    each scaled by ``k * B`` instead of ``B`` under mean reduction; the per-image gradient is the mean of
    its ``k`` rows. Without this, clipping would bound per-piece, not per-image, contributions.
    """
    if batch_size <= 0:
        return
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None or gs.shape[0] == batch_size:
            continue
        if gs.shape[0] % batch_size:
            raise ModelError(f"per-sample gradient has {gs.shape[0]} rows for a batch of {batch_size}: "
                             "the model mixes samples across the batch")
        k = gs.shape[0] // batch_size
        p.grad_sample = gs.reshape(batch_size, k, *gs.shape[1:]).mean(dim=1)


def check_per_sample_gradients(model: nn.Module, input_shape: tuple[int, int, int], name: str = "model") -> None:
    """Run one per-sample-gradient pass on two random inputs; raise ModelError (one line) if Opacus fails."""
    from opacus import GradSampleModule

    was_training = model.training
    gsm = None
    try:
        gsm = GradSampleModule(model)
        x = torch.rand(2, *input_shape)
        out = gsm(x)
        out.float().sum().backward()
        fold_grad_samples(model.parameters(), 2)
        for pname, p in model.named_parameters():
            if p.requires_grad and (getattr(p, "grad_sample", None) is None or p.grad_sample.shape[0] != 2):
                raise ModelError(f"model '{name}' cannot be trained with DP-SGD: no per-sample gradient "
                                 f"for parameter '{pname}'")
    except ModelError:
        raise
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"model '{name}' cannot be trained with DP-SGD: {reason}") from e
    finally:
        if gsm is not None:
            gsm._close()
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: torch.utils.data.DataLoader,
                 noise_multiplier: float, max_grad_norm: float, noise_generator: torch.Generator):
    """Wrap model, optimizer and loader for DP-SGD: Poisson sampling and flat per-sample clipping.

    Returns (grad_sample_module, dp_optimizer, dp_data_loader, sample_rate). Accounting is not done here:
    the caller records (noise_multiplier, sample_rate, steps) in the site's ``PrivacyLedger``.
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off" is expected: determinism under a seed
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, clipping="flat", noise_generator=noise_generator,
            grad_sample_mode="hooks")
    return module, dp_optimizer, dp_loader, 1.0 / len(data_loader)


def memory_safe_batches(data_loader, max_physical_batch_size: int, optimizer):
    """Opacus's BatchMemoryManager: logical (Poisson) batches split into physical ones that fit memory."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    return BatchMemoryManager(data_loader=data_loader, max_physical_batch_size=max_physical_batch_size,
                              optimizer=optimizer)


def release(module: nn.Module) -> None:
    """Remove Opacus's hooks and per-sample gradient buffers from a GradSampleModule."""
    if hasattr(module, "_close"):
        module._close()
