"""Local training: DP-SGD through Opacus (``train_private``) or plain SGD (``train_nonprivate``), and evaluation.

Both trainers take the same arguments and share one loop; the private one adds Poisson sampling, flat
per-sample clipping, calibrated Gaussian noise and a ledger entry written *before* the first step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fedvision import dp
from fedvision.errors import ConfigError, DataError
from fedvision.io import default_device
from fedvision.privacy import PrivacyLedger


@dataclass
class TrainConfig:
    """Local training hyper-parameters (the ``fedvision.config`` run config maps onto these)."""

    epochs: int = 1
    batch_size: int = 64  # expected logical batch size; under Poisson sampling q = batch_size / N
    max_physical_batch_size: int = 128  # memory bound; logical batches are split by BatchMemoryManager
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # "sgd" or "adam"
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    noise_multiplier: float | None = None  # σ; derived from the ε allotment when None
    min_noise_multiplier: float = 0.0  # the site's floor on σ
    epsilon_budget: float | None = None  # the site's lifetime ε for its training records (the ledger enforces it)
    run_epsilon: float | None = None  # what this run may add to the ledger's ε (None: the rest of the budget)
    delta: float = 1e-5
    planned_steps: int | None = None  # local steps planned over all rounds (σ calibration); None = this training
    max_noise_multiplier: float = 20.0  # a budget needing more noise than this is refused: training would be noise
    noise_std: float = 0.0  # Gaussian noise augmentation on inputs (for randomized-smoothing certification)
    proximal_mu: float = 0.0  # FedProx: pulls weights towards the global model; data-independent, so free
    class_weights: Sequence[float] | None = None  # per-class loss weights (long-tailed labels)
    seed: int = 0  # public: initialisation order, shuffling and augmentation; never DP noise or sampling
    # TEST ONLY: seed DP noise and Poisson sampling for bit-identical trainings. Anyone who knows the seed can
    # subtract the noise, so such a training is not private; its ledger entry records the seeded source.
    # Only the run config's simulation-only test hook insecure-shared-dp-seed reaches it; deployed sites refuse that.
    insecure_dp_seed: int | None = None
    device: str | None = None  # None: CUDA when present, else CPU
    progress: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")

        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer ≥ 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an integer ≥ 1")
        need(isinstance(self.max_physical_batch_size, int) and self.max_physical_batch_size >= 1,
             "max_physical_batch_size", "an integer ≥ 1")
        need(_finite(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(_finite(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "≥ 0")
        need(self.optimizer in ("sgd", "adam"), "optimizer", "'sgd' or 'adam'")
        need(_finite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        need(self.noise_multiplier is None or (_finite(self.noise_multiplier) and self.noise_multiplier >= 0),
             "noise_multiplier", "a number ≥ 0")
        if self.epsilon_budget is not None:
            dp.validate_epsilon(self.epsilon_budget, "epsilon_budget")
        if self.run_epsilon is not None:
            dp.validate_epsilon(self.run_epsilon, "run_epsilon")
        need(_finite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0, "min_noise_multiplier",
             "a number ≥ 0")
        dp.validate_delta(self.delta)
        need(self.planned_steps is None or (isinstance(self.planned_steps, int) and self.planned_steps >= 1),
             "planned_steps", "an integer ≥ 1")
        need(_finite(self.max_noise_multiplier) and self.max_noise_multiplier > 0, "max_noise_multiplier",
             "a number > 0")
        need(_finite(self.noise_std) and self.noise_std >= 0, "noise_std", "a number ≥ 0")
        need(_finite(self.proximal_mu) and self.proximal_mu >= 0, "proximal_mu", "a number ≥ 0")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainResult:
    num_examples: int
    loss: float  # mean per-sample training loss over the last epoch
    steps: int  # optimizer steps taken (logical batches)
    seconds: float
    private: bool
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    epsilon: float | None = None  # the site's cumulative ε after this training (from the ledger)
    delta: float | None = None
    randomness: str | None = None  # source of the DP noise and sampling (dp.SECRET_SOURCE unless a test seeded it)
    history: list[float] = field(default_factory=list)  # mean loss per epoch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Logical steps in one epoch; under Poisson sampling the sample rate is 1 / steps_per_epoch."""
    return max(1, math.ceil(num_examples / batch_size))


def train_private(model: nn.Module, dataset: Dataset, config: TrainConfig, ledger: PrivacyLedger | None = None,
                  global_params: dict[str, torch.Tensor] | None = None,
                  charge: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` in place with DP-SGD for ``config.epochs`` epochs.

    σ is ``config.noise_multiplier`` or, when None, the smallest σ for which ``config.planned_steps`` steps
    (default: this training's steps) bring the ledger's ε to what earlier runs spent plus ``config.run_epsilon``
    (default: to ``config.epsilon_budget``), and never below ``config.min_noise_multiplier``. Noise and Poisson
    sampling draw on fresh OS entropy (``dp.PrivateRandomness``), never on ``config.seed``.
    With a ledger, the budget check and the charge are one locked operation before the first step: training
    that would exceed the budget or the run's allotment is refused before any step, and the charge carries
    ``charge`` (run, round…) and the randomness source beside it.
    """
    return _train(model, dataset, config, ledger, global_params, private=True, charge=charge)


def train_nonprivate(model: nn.Module, dataset: Dataset, config: TrainConfig, ledger: PrivacyLedger | None = None,
                     global_params: dict[str, torch.Tensor] | None = None,
                     charge: dict[str, Any] | None = None) -> TrainResult:
    """Same signature as ``train_private``, plain mini-batch SGD; no privacy guarantee, nothing recorded."""
    return _train(model, dataset, config, ledger, global_params, private=False)


def _train(model: nn.Module, dataset: Dataset, config: TrainConfig, ledger: PrivacyLedger | None,
           global_params: dict[str, torch.Tensor] | None, private: bool,
           charge: dict[str, Any] | None = None) -> TrainResult:
    n = len(dataset)
    if n == 0:
        raise DataError("cannot train on an empty dataset")
    device = torch.device(config.device) if config.device else default_device()
    torch.manual_seed(config.seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    loader = DataLoader(dataset, batch_size=min(config.batch_size, n), shuffle=not private,
                        generator=torch.Generator().manual_seed(config.seed))
    steps_epoch = len(loader)
    steps = config.epochs * steps_epoch
    weights = None
    if config.class_weights is not None:
        weights = torch.as_tensor(list(config.class_weights), dtype=torch.float32, device=device)
    anchor = None
    if config.proximal_mu > 0:
        if global_params is None:
            raise ConfigError("proximal_mu > 0 needs the global model's parameters (global_params)")
        anchor = {k: v.detach().to(device) for k, v in global_params.items()}

    result = TrainResult(num_examples=n, loss=float("nan"), steps=steps, seconds=0.0, private=private)
    train_module = model
    if private:
        randomness = (dp.PrivateRandomness.secret(device) if config.insecure_dp_seed is None
                      else dp.PrivateRandomness.seeded(config.insecure_dp_seed, device))
        sample_rate = 1.0 / steps_epoch
        sigma = _noise_multiplier(config, ledger, sample_rate, steps, (charge or {}).get("run"))
        if ledger is not None:
            result.epsilon = ledger.charge(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                                           delta=config.delta, budget=config.epsilon_budget,
                                           run_epsilon=config.run_epsilon, randomness=randomness.source,
                                           **(charge or {}))
        train_module, optimizer, loader, sample_rate = dp.make_private(
            model, optimizer, loader, sigma, config.max_grad_norm, randomness)
        result.noise_multiplier, result.sample_rate, result.delta = sigma, sample_rate, config.delta
        result.randomness = randomness.source

    aug_gen = torch.Generator(device=device).manual_seed(config.seed + 2)
    start = time.perf_counter()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="DP-SGD" if private else "SGD", unit="step", disable=not config.progress,
                   leave=False)
        for _ in range(config.epochs):
            total_loss, seen = 0.0, 0
            if private:
                with dp.memory_safe_batches(loader, config.max_physical_batch_size, optimizer) as batches:
                    for x, y in batches:
                        total_loss, seen = _step(train_module, optimizer, x, y, device, config, weights,
                                                 aug_gen, anchor, total_loss, seen, private=True)
                        if not optimizer._is_last_step_skipped:
                            bar.update(1)
            else:
                for x, y in loader:
                    total_loss, seen = _step(train_module, optimizer, x, y, device, config, weights,
                                             aug_gen, anchor, total_loss, seen, private=False)
                    bar.update(1)
            result.history.append(total_loss / max(seen, 1))
        bar.close()
    finally:
        if private:
            dp.release(train_module)
    result.loss = result.history[-1]
    result.seconds = time.perf_counter() - start
    return result


def _noise_multiplier(config: TrainConfig, ledger: PrivacyLedger | None, sample_rate: float, steps: int,
                      run: str | None) -> float:
    """σ for this training: the configured one, or calibrated for the whole plan (not for what is left, so every
    round of a run uses the same σ, and a round beyond the plan is refused instead of drowned in noise)."""
    sigma = config.noise_multiplier
    if sigma is None:
        if config.epsilon_budget is None:
            raise ConfigError("DP training needs noise_multiplier or epsilon_budget")
        planned = config.planned_steps or steps
        if ledger is not None:
            sigma = ledger.noise_for_run(delta=config.delta, sample_rate=sample_rate, planned_steps=planned,
                                         budget=config.epsilon_budget, run_epsilon=config.run_epsilon, run=run,
                                         max_noise_multiplier=config.max_noise_multiplier)
        else:
            target = min(config.epsilon_budget, config.run_epsilon or math.inf)
            sigma = dp.noise_for_budget(target, config.delta, sample_rate, planned, config.max_noise_multiplier)
    return max(sigma, config.min_noise_multiplier)


def _step(module, optimizer, x, y, device, config: TrainConfig, weights, aug_gen, anchor, total_loss, seen,
          private: bool):
    x, y = x.to(device), y.to(device)
    if config.noise_std > 0 and len(x):
        x = x + config.noise_std * torch.randn(x.shape, generator=aug_gen, device=device)
    optimizer.zero_grad(set_to_none=True)
    out = module(x)
    # Per-sample losses, weighted per sample: each sample's loss depends only on that sample (a weighted mean
    # would couple samples through the sum of weights).
    losses = F.cross_entropy(out, y, reduction="none")
    if weights is not None:
        losses = losses * weights[y]
    if private:  # the clipped sum Σᵢ cᵢ∇ℓᵢ; the DP optimizer adds noise and divides by the expected batch size
        module.clipped_backward(losses, config.max_grad_norm)
    else:
        losses.mean().backward()
    optimizer.step()
    if anchor is not None and not getattr(optimizer, "_is_last_step_skipped", False):
        # FedProx's proximal term μ/2·||w − w_global||² as a separate, data-independent gradient step
        # (added after the privatised gradient, so it costs no privacy and is not clipped).
        with torch.no_grad():
            model = module.model if private else module  # the clipper wraps the model
            for name, p in model.named_parameters():
                if name in anchor:
                    p.sub_(config.lr * config.proximal_mu * (p - anchor[name]))
    return total_loss + float(losses.detach().sum()), seen + len(x)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    y_true: np.ndarray
    y_pred: np.ndarray


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | None = None):
    """Logits and labels for every sample of ``dataset`` (in order)."""
    dev = torch.device(device) if device else default_device()
    model.to(dev).eval()
    logits, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits.append(model(x.to(dev)).float().cpu())
        labels.append(torch.as_tensor(y))
    if not logits:
        raise DataError("cannot evaluate on an empty dataset")
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | None = None) -> EvalResult:
    """Cross-entropy loss and accuracy, with the labels and predictions for per-group analysis."""
    logits, labels = predict_logits(model, dataset, batch_size, device)
    pred = logits.argmax(1)
    return EvalResult(loss=float(F.cross_entropy(logits, labels)), accuracy=float((pred == labels).float().mean()),
                      num_examples=len(labels), y_true=labels.numpy(), y_pred=pred.numpy())
