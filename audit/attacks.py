"""Empirical robustness: white-box attacks from torchattacks 3.3.0, the smoothed classifier under the same
adversarial inputs, and the sanity checks that catch a broken evaluation or gradient masking.

Attacks (images in [0, 1]):

* ``fgsm`` (L∞, one step), ``pgd`` (L∞, Madry et al.), ``pgd-l2``: ε-bounded. PGD's step size scales with ε,
  α = 2.5·ε/steps (Madry et al.), with a random start, so a large ε is not under-attacked.
* ``autoattack`` (L∞) / ``autoattack-l2``: torchattacks' AutoAttack "standard" ensemble (APGD-CE, APGD-T,
  FAB-T, Square with 5,000 queries; each runs only on the points still robust, so the result is the worst
  case per point) with ``n_classes`` set from the model. The targeted DLR loss of APGD-T needs ≥ 4 classes; with
  fewer, APGD-T is left out (as the original AutoAttack warns) and the row says so.
* ``cw`` (Carlini–Wagner L2, fixed c, no binary search) and ``deepfool`` (L2): minimum-norm attacks. They run
  once; at a given ε an image counts as broken only if the attack fooled the model with a perturbation of L2
  norm ≤ ε (the row has ``minimum_norm: true``).

Robust accuracy counts an image as robust only if it was classified correctly *and* still is after the
attack; the attack success rate is taken among the initially correct images. Every row keeps the per-image
outcome (``robust_per_image``, one "1"/"0" per image), so that attacks can be compared on the same images: the
sanity checks are paired tests, and the worst case over attacks is taken per image.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from audit import ATTACK_NORMS, DEFAULT_ATTACKS, DEFAULT_EPS, MINIMUM_NORM_ATTACKS
from audit.smoothing import Smooth, _device_of, infer_num_classes
from fedvision.errors import ConfigError, DataError

# Family-wise level of the sanity checks' paired tests: a check fails only when an exact one-sided sign test on
# the images where two attacks disagree rejects "the stronger attack is not weaker" at SANITY_LEVEL divided by the
# number of comparisons made (Bonferroni), so random starts and floating-point differences between CPUs (one
# image flipping) cannot raise a gradient-masking alarm on their own.
SANITY_LEVEL = 0.05

_NORM_ALIASES = {"linf": "Linf", "l_inf": "Linf", "inf": "Linf", "l∞": "Linf", "l2": "L2", "l_2": "L2"}


def run_attack_suite(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     attacks: Sequence[str] = DEFAULT_ATTACKS,
                     eps: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                     num_classes: int | None = None, *, steps: int = 10, restarts: int = 1,
                     steps_check: bool = True, cw_c: float = 1.0, cw_steps: int = 50, cw_lr: float = 0.01,
                     deepfool_steps: int = 50, deepfool_overshoot: float = 0.02, batch_size: int = 128,
                     smooth: Smooth | None = None, smooth_n: int = 100, smooth_alpha: float = 0.001,
                     smooth_batch_size: int = 1000, smooth_limit: int | None = None, seed: int = 0,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Attack ``model`` on ``images`` (N×C×H×W in [0, 1]) and return one row per (attack, ε).

    ``eps``: a list applied to every attack (in each attack's own norm), or a dict norm → list
    (``{"Linf": [...], "L2": [...]}``); None uses ``DEFAULT_EPS``. Every row has ``name`` (as given),
    ``norm``, ``eps``, ``clean_accuracy``, ``robust_accuracy``, ``attack_success_rate`` (among initially
    correct images), ``n``, the attack's parameters (``steps``, step size ``alpha``, ``restarts``, ...),
    ``max_perturbation`` (largest perturbation actually used, in the attack's norm) and ``purpose``.

    ``steps_check`` adds one PGD row (PGD-L2 if PGD is not run) with half the steps (twice if ``steps`` is 1)
    at the ε where the normal run is most informative (robust accuracy nearest half the clean accuracy), for
    the "more steps are not weaker" check. (At ε = 0 PGD takes one step: its step size there is 0.) The
    evaluation row at that ε then keeps the best of both runs per image (an image broken by either is broken;
    ``single_run_robust_accuracy`` is the evaluation run alone), since both are attacks within the same ε.

    With ``smooth`` (a ``Smooth`` around the same model), each row also reports the smoothed classifier's
    PREDICT (``smooth_n`` samples, ``smooth_alpha``) on the same adversarial inputs for the first
    ``smooth_limit`` images: ``smoothed_*`` fields next to the base model's numbers on those images. The attacks
    target the base model (they are not adaptive to the smoothing), so these are transfer numbers.
    """
    attacks = _check_attacks(attacks)
    eps_by_attack = resolve_eps(eps, attacks)
    images, labels = _check_inputs(images, labels)
    for name, value in (("steps", steps), ("restarts", restarts), ("cw_steps", cw_steps),
                        ("deepfool_steps", deepfool_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
    device = _device_of(model)
    if num_classes is None:
        num_classes = infer_num_classes(model, images[0])
    suite = _Suite(model, images.to(device), labels.to(device), num_classes, batch_size, seed, smooth,
                   dict(n=smooth_n, alpha=smooth_alpha, batch_size=smooth_batch_size), smooth_limit)
    settings = dict(steps=steps, restarts=restarts, cw=(cw_c, cw_steps, cw_lr),
                    deepfool=(deepfool_steps, deepfool_overshoot))

    from tqdm.auto import tqdm

    check = next((a for a in ("pgd", "pgd-l2") if a in attacks and any(eps_by_attack[a])), None) \
        if steps_check else None
    check_steps = steps // 2 if steps >= 2 else 2
    total = sum(1 if a in MINIMUM_NORM_ATTACKS else len(eps_by_attack[a]) for a in attacks) + (check is not None)
    bar = tqdm(total=total, desc="attacks", unit="run", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for name in attacks:
            if name in MINIMUM_NORM_ATTACKS:
                bar.set_postfix_str(name)
                rows += suite.minimum_norm(name, eps_by_attack[name], settings)
                bar.update(1)
                continue
            own = []
            for e in eps_by_attack[name]:
                bar.set_postfix_str(f"{name} ε={e:.4g}")
                own.append(suite.bounded(name, e, settings))
                bar.update(1)
            rows += own
            if name == check:
                e = _most_informative_eps(own)
                bar.set_postfix_str(f"{name} ε={e:.4g} {check_steps} steps")
                extra = suite.bounded(name, e, dict(settings, steps=check_steps),
                                      purpose=f"sanity check: {check_steps} steps")
                rows.append(extra)
                _keep_best_of_both(next(r for r in own if r["eps"] == e), extra)
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return rows


def resolve_eps(eps: Sequence[float] | Mapping[str, Sequence[float]] | None,
                attacks: Iterable[str]) -> dict[str, list[float]]:
    """ε list per attack: a list for all attacks, a dict norm → list, or None for the defaults."""
    attacks = _check_attacks(attacks)
    if eps is None:
        by_norm = {norm: list(values) for norm, values in DEFAULT_EPS.items()}
    elif isinstance(eps, Mapping):
        by_norm = {}
        for key, values in eps.items():
            norm = _NORM_ALIASES.get(str(key).strip().lower())
            if norm is None:
                raise ConfigError(f"eps: unknown norm {key!r} (use 'Linf' or 'L2')")
            by_norm[norm] = values
    else:
        by_norm = {"Linf": eps, "L2": eps}
    out = {}
    for name in attacks:
        norm = ATTACK_NORMS[name]
        if norm not in by_norm:
            raise ConfigError(f"eps: no {norm} values given, but attack '{name}' needs them")
        out[name] = _check_eps_list(by_norm[norm], norm)
    return out


def parse_eps(tokens: Sequence[str]) -> list[float] | dict[str, list[float]]:
    """Read ``--eps`` values: numbers or fractions (``0 2/255 8/255``, also comma-separated) applied to every
    attack, or per norm (``linf:0,2/255,8/255 l2:0,0.25,0.5``)."""
    plain: list[float] = []
    by_norm: dict[str, list[float]] = {}
    for token in tokens:
        key, sep, values = str(token).rpartition(":")
        numbers = [_number(v) for v in values.split(",") if v.strip()]
        if not numbers:
            raise ConfigError(f"--eps: no values in {token!r}")
        if sep:
            norm = _NORM_ALIASES.get(key.strip().lower())
            if norm is None:
                raise ConfigError(f"--eps: unknown norm {key!r} in {token!r} (use linf: or l2:)")
            by_norm.setdefault(norm, []).extend(numbers)
        else:
            plain.extend(numbers)
    if plain and by_norm:
        raise ConfigError("--eps: give either plain values for all attacks or per-norm lists (linf:..., l2:...)")
    return by_norm or plain


def _number(text: str) -> float:
    text = text.strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--eps: cannot read {text!r} as a number (write e.g. 8/255 or 0.5)") from None


def _check_eps_list(values: Any, norm: str) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        values = [float(v) for v in values if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise ConfigError(f"eps: {norm} values must be numbers, got {values!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"eps: {norm} values must be finite numbers ≥ 0, got {values!r}")
    if norm == "Linf" and max(values) > 1:
        raise ConfigError(f"eps: L∞ ε must be ≤ 1 for images in [0, 1] (8/255 is standard), got {max(values)}")
    return sorted(set(values))


# --------------------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------------------
class _Suite:
    """Shared state of one suite run: clean predictions, batching, seeding and the smoothed comparison."""

    def __init__(self, model, images, labels, num_classes, batch_size, seed, smooth, smooth_args, smooth_limit):
        self.model, self.images, self.labels = model, images, labels
        self.num_classes, self.batch_size, self.seed = num_classes, batch_size, seed
        self.clean_correct = self._predict(images) == labels
        self.clean_accuracy = _fraction(self.clean_correct)
        self.smooth, self.smooth_args = smooth, smooth_args
        if smooth is not None:
            k = len(images) if smooth_limit is None else max(1, min(int(smooth_limit), len(images)))
            self.smooth_k = k
            self.smooth_clean = torch.tensor([smooth.predict(images[i], **smooth_args) for i in range(k)],
                                             device=labels.device)

    # ---- ε-bounded attacks --------------------------------------------------------------------------
    def bounded(self, name: str, eps: float, settings: dict, purpose: str = "evaluation") -> dict[str, Any]:
        norm = ATTACK_NORMS[name]
        if eps == 0 and name == "pgd":
            settings = dict(settings, steps=1)  # a step of size 2.5·0/steps is a no-op: one shows it
        attack, params = self._make(name, eps, settings)
        t0 = time.perf_counter()
        # At ε = 0 the only admissible input is x itself. FGSM and PGD still run there (their step size is
        # 0, so any change is a bug the ε = 0 check catches); PGD-L2 would divide 0 by 0 in torchattacks, and
        # AutoAttack's Square would spend its 5,000 queries on every image.
        run = eps > 0 or name in ("fgsm", "pgd")
        adv = self._attack(attack, params.get("restarts", 1)) if run else self.images.clone()
        seconds = time.perf_counter() - t0
        robust = self.clean_correct & (self._predict(adv) == self.labels)
        row = self._row(name, norm, eps, robust, purpose, minimum_norm=False, attack_run=run, seconds=seconds,
                        max_perturbation=_norms(adv - self.images, norm).max().item(), **params)
        if purpose == "evaluation":
            self._add_smoothed(row, adv, robust)
        return row

    def _make(self, name: str, eps: float, settings: dict):
        import torchattacks as ta

        steps = settings["steps"]
        if name == "fgsm":
            return ta.FGSM(self.model, eps=eps), {"steps": 1, "alpha": eps, "restarts": 1, "random_start": False}
        if name in ("pgd", "pgd-l2"):
            alpha = 2.5 * eps / steps
            cls = ta.PGD if name == "pgd" else ta.PGDL2
            return (cls(self.model, eps=eps, alpha=alpha, steps=steps, random_start=True),
                    {"steps": steps, "alpha": alpha, "restarts": settings["restarts"], "random_start": True})
        # AutoAttack "standard"; torchattacks runs APGD/APGD-T/FAB at their default 10 iterations.
        norm = ATTACK_NORMS[name]
        if self.num_classes >= 4:
            attack = ta.AutoAttack(self.model, norm=norm, eps=eps, version="standard", n_classes=self.num_classes,
                                   seed=self.seed)
            components = ["apgd-ce", "apgd-t", "fab-t", "square"]
        else:
            attack = ta.MultiAttack([
                ta.APGD(self.model, eps=eps, norm=norm, seed=self.seed, loss="ce", n_restarts=1),
                ta.FAB(self.model, eps=eps, norm=norm, seed=self.seed, multi_targeted=True,
                       n_classes=self.num_classes, n_restarts=1),
                ta.Square(self.model, eps=eps, norm=norm, seed=self.seed, n_queries=5000, n_restarts=1),
            ])
            components = ["apgd-ce", "fab-t", "square"]
        note = "" if self.num_classes >= 4 else \
            f"APGD-T left out: its targeted DLR loss needs ≥ 4 classes, the model has {self.num_classes}"
        return attack, {"version": "standard", "components": "+".join(components), "steps": 10,
                        "n_queries": 5000, "restarts": 1, "n_classes": self.num_classes, "note": note}

    # ---- minimum-norm attacks -----------------------------------------------------------------------
    def minimum_norm(self, name: str, eps_list: list[float], settings: dict) -> list[dict[str, Any]]:
        import torchattacks as ta

        if name == "cw":
            c, steps, lr = settings["cw"]
            attack = ta.CW(self.model, c=c, kappa=0, steps=steps, lr=lr)
            params = {"steps": steps, "c": c, "kappa": 0.0, "lr": lr}
        else:
            steps, overshoot = settings["deepfool"]
            attack = ta.DeepFool(self.model, steps=steps, overshoot=overshoot)
            params = {"steps": steps, "overshoot": overshoot}
        t0 = time.perf_counter()
        with _one_thread(name == "deepfool" and self.images.device.type == "cpu"):
            adv = self._attack(attack, 1)
        seconds = time.perf_counter() - t0
        norms = _norms(adv - self.images, "L2")
        fooled = self.clean_correct & (self._predict(adv) != self.labels)
        found = fooled.float().sum().item() / max(self.clean_correct.sum().item(), 1)
        median = norms[fooled].median().item() if fooled.any() else None
        rows = []
        for eps in eps_list:
            within = fooled & (norms <= eps)
            robust = self.clean_correct & ~within
            row = self._row(name, "L2", eps, robust, "evaluation", minimum_norm=True, attack_run=True,
                            seconds=seconds, max_perturbation=norms[within].max().item() if within.any() else 0.0,
                            **params, found_adversarial_rate=found, median_adversarial_norm=median,
                            note="minimum-norm attack run once: an image counts as broken at ε only if the "
                                 "attack fooled the model with a perturbation of L2 norm ≤ ε")
            # The adversarial input at ε: the attack's output where it is within ε, else the clean image.
            self._add_smoothed(row, torch.where(within.view(-1, 1, 1, 1), adv, self.images), robust)
            rows.append(row)
        return rows

    # ---- shared -------------------------------------------------------------------------------------
    def _row(self, name, norm, eps, robust, purpose, **fields) -> dict[str, Any]:
        correct = int(self.clean_correct.sum())
        broken = int((self.clean_correct & ~robust).sum())
        return {"name": name, "norm": norm, "eps": eps, "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": _fraction(robust),
                "attack_success_rate": broken / correct if correct else None,
                "n": len(self.labels), "purpose": purpose, **fields, "robust_per_image": _bits(robust)}

    def _attack(self, attack, restarts: int) -> torch.Tensor:
        """Adversarial images, batch by batch, seeded; with restarts, the first run that fools each image."""
        device = self.images.device
        devices = [torch.cuda.current_device() if device.index is None else device.index] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            out = []
            for i in range(0, len(self.images), self.batch_size):
                x, y = self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]
                best = attack(x, y)
                for _ in range(restarts - 1):
                    robust = self._predict(best) == y
                    if not robust.any():
                        break
                    again = attack(x, y)
                    best = torch.where(robust.view(-1, 1, 1, 1), again, best)
                out.append(best.detach())
        return torch.cat(out)

    @torch.inference_mode()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x[i:i + self.batch_size]).argmax(1) for i in range(0, len(x), self.batch_size)])

    def _add_smoothed(self, row: dict, adv: torch.Tensor, robust: torch.Tensor) -> None:
        """The smoothed classifier's PREDICT on the same adversarial inputs, next to the base model's numbers."""
        if self.smooth is None:
            return
        k, y, clean = self.smooth_k, self.labels[:self.smooth_k], self.smooth_clean
        pred = clean.clone()
        for i in range(k):
            # Only images g got right can be broken; an unchanged input keeps g's clean prediction.
            if clean[i] == y[i] and not torch.equal(adv[i], self.images[i]):
                pred[i] = self.smooth.predict(adv[i], **self.smooth_args)
        correct = clean == y
        s_robust = correct & (pred == y)
        base_correct, base_robust = self.clean_correct[:k], robust[:k]
        n_correct, n_base = int(correct.sum()), int(base_correct.sum())
        row.update({
            "smoothed_n": k, "smoothed_sigma": self.smooth.sigma, "smoothed_samples": self.smooth_args["n"],
            "smoothed_alpha": self.smooth_args["alpha"],
            "smoothed_clean_accuracy": _fraction(correct),
            "smoothed_robust_accuracy": _fraction(s_robust),
            "smoothed_attack_success_rate": int((correct & ~s_robust).sum()) / n_correct if n_correct else None,
            "smoothed_abstain_rate": int((correct & (pred == Smooth.ABSTAIN)).sum()) / n_correct if n_correct else None,
            "base_robust_accuracy_same_images": _fraction(base_robust),
            "base_attack_success_rate_same_images":
                int((base_correct & ~base_robust).sum()) / n_base if n_base else None,
        })


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """torchattacks' DeepFool works one image at a time: on CPU, intra-op threads only add synchronisation
    (20× slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bits(mask: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.tolist())


def _mask(row: Mapping[str, Any]) -> list[bool] | None:
    bits = row.get("robust_per_image")
    return [c == "1" for c in bits] if isinstance(bits, str) and bits else None


def _keep_best_of_both(row: dict, other: Mapping[str, Any]) -> None:
    """Make ``row`` count an image as broken when ``other`` (another attack within the same ε) broke it."""
    a, b = _mask(row), _mask(other)
    both = [x and y for x, y in zip(a, b)]
    correct = round(row["clean_accuracy"] * row["n"])
    row.update(single_run_robust_accuracy=row["robust_accuracy"], single_run_per_image=row["robust_per_image"],
               robust_accuracy=sum(both) / row["n"],
               attack_success_rate=(correct - sum(both)) / correct if correct else None,
               robust_per_image="".join("1" if v else "0" for v in both),
               note="; ".join(filter(None, [row.get("note"), f"worst case per image over this run and the "
                                                              f"{other['steps']}-step sanity-check run"])))


def worst_case_per_image(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per norm and ε, the robust accuracy when an image counts as broken if any attack of that norm broke it
    within that ε (an adversarial example within a smaller ε is one within ε too), AutoAttack's worst case per
    point. Rows without per-image results fall back on the lowest robust accuracy over the attacks."""
    out: dict[str, list[dict[str, Any]]] = {}
    for norm in sorted({r["norm"] for r in rows}):
        mine = [r for r in rows if r["norm"] == norm]
        for eps in sorted({r["eps"] for r in mine}):
            within = [r for r in mine if r["eps"] <= eps]
            at = [r for r in mine if r["eps"] == eps and r.get("purpose", "evaluation") == "evaluation"]
            if not at:
                continue
            best = min(at, key=lambda r: r["robust_accuracy"])
            masks = [_mask(r) for r in within]
            paired = all(m is not None and len(m) == len(masks[0]) for m in masks)
            robust = sum(all(m[i] for m in masks) for i in range(len(masks[0]))) / len(masks[0]) if paired \
                else best["robust_accuracy"]
            out.setdefault(norm, []).append({
                "eps": eps, "robust_accuracy": robust, "attack": best["name"],
                "attacks": sorted({r["name"] for r in at}), "per_image": paired})
    return out


def _most_informative_eps(rows: list[dict]) -> float:
    """Non-zero ε whose robust accuracy is nearest half the clean accuracy (smallest such ε on ties)."""
    candidates = [r for r in rows if r["eps"] > 0]
    return min(candidates, key=lambda r: (abs(r["robust_accuracy"] - r["clean_accuracy"] / 2), r["eps"]))["eps"]


def _fraction(mask: torch.Tensor) -> float:
    return int(mask.sum()) / mask.numel()


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1).float()
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def _check_attacks(attacks: Sequence[str]) -> list[str]:
    if isinstance(attacks, str):
        attacks = [attacks]
    attacks = list(dict.fromkeys(str(a).strip() for a in attacks))
    unknown = [a for a in attacks if a not in ATTACK_NORMS]
    if unknown or not attacks:
        raise ConfigError(f"unknown attack {unknown[0] if unknown else '(none given)'!r}: "
                          f"choose from {', '.join(ATTACK_NORMS)}")
    return attacks


def _check_inputs(images: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels).long().flatten()
    if images.dim() != 4 or len(images) != len(labels) or len(images) == 0:
        raise DataError(f"attacks need images N×C×H×W and N labels, got {tuple(images.shape)} and {len(labels)}")
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise DataError("attacks need images with values in [0, 1] (the models' input range)")
    return images, labels


# --------------------------------------------------------------------------------------------------------
# sanity checks
# --------------------------------------------------------------------------------------------------------
def sanity_checks(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.0,
                  level: float = SANITY_LEVEL) -> list[dict[str, Any]]:
    """Checks every sound evaluation passes; a failure flags possible gradient masking or a broken evaluation.

    * ``eps0_equals_clean``: robust accuracy at ε = 0 equals clean accuracy (exactly: at ε = 0 the attack may
      not change any input, so any difference is a bug or randomness in the model);
    * ``monotone_in_eps``: robust accuracy does not rise with ε (per attack and setting);
    * ``pgd_not_weaker_than_fgsm``: PGD is not weaker than FGSM at the same ε;
    * ``more_steps_not_weaker``: PGD with more steps is not weaker than PGD with fewer at the same ε.

    The last three compare two runs on the same images (paired): of the images where the runs disagree, b were
    broken only by the run that should be weaker and c only by the one that should be stronger. The check fails
    when the exact one-sided sign test (McNemar's exact test) of b out of b + c at p = ½ has p-value ≤
    ``level`` / m, m the number of paired comparisons made (Bonferroni): a stronger attack that loses one image
    to a random start is noise, one that systematically breaks fewer images is not. Rows without per-image
    results (``robust_per_image``) are compared by their robust accuracies, failing any difference above
    ``tolerance``. Returns one ``{"check", "attack", "passed", "detail", "test"}`` per check made.
    """
    evaluation = [r for r in rows if r.get("purpose", "evaluation") == "evaluation"]
    groups: dict[str, list] = defaultdict(list)
    for r in evaluation:
        # each run on its own: a row that kept the best of two runs would make its neighbours look weaker
        groups[r["name"]].append(_single_run(r))
    for name in groups:
        groups[name].sort(key=lambda r: r["eps"])

    # (check, attack, [(weaker, stronger, what)]): the runs that should be weaker and stronger (the same
    # attack at a larger ε is stronger), compared on the same images.
    planned: list[tuple[str, str, list[tuple[Mapping, Mapping, str]]]] = []
    for name, group in groups.items():
        if len(group) > 1:
            planned.append(("monotone_in_eps", name, [
                (a, b, f"ε = {a['eps']:.4g} vs ε = {b['eps']:.4g}") for a, b in zip(group, group[1:])]))
    fgsm = {r["eps"]: r for r in groups.get("fgsm", [])}
    common = [r for r in groups.get("pgd", []) if r["eps"] in fgsm and r["eps"] > 0]
    if common:
        planned.append(("pgd_not_weaker_than_fgsm", "pgd",
                        [(fgsm[r["eps"]], r, f"FGSM vs PGD at ε = {r['eps']:.4g}") for r in common]))
    by_setting: dict[tuple, dict[int, Mapping]] = defaultdict(dict)
    for r in rows:
        if r["name"] in ("pgd", "pgd-l2") and r["eps"] > 0:
            by_setting[(r["name"], r["eps"])][r["steps"]] = _single_run(r)
    for (name, eps), by_steps in sorted(by_setting.items()):
        steps = sorted(by_steps)
        if len(steps) > 1:
            planned.append(("more_steps_not_weaker", name, [
                (by_steps[a], by_steps[b], f"{a} vs {b} steps at ε = {eps:.4g}") for a, b in zip(steps, steps[1:])]))
    comparisons = sum(len(pairs) for *_, pairs in planned)
    threshold = level / max(comparisons, 1)
    test = (f"exact one-sided sign test on the images where the two runs disagree, family-wise level {level:g} "
            f"over {comparisons} comparisons (each at {threshold:.3g})")

    out = []
    for name, group in groups.items():
        zero = [r for r in group if r["eps"] == 0]
        if zero:
            r = zero[0]
            ok = abs(r["robust_accuracy"] - r["clean_accuracy"]) <= 1e-12
            out.append({"check": "eps0_equals_clean", "attack": name, "passed": ok, "test": "exact equality",
                        "detail": f"robust = clean = {r['clean_accuracy']:.4f} at ε = 0" if ok else
                        f"robust accuracy {r['robust_accuracy']:.4f} ≠ clean accuracy {r['clean_accuracy']:.4f} at "
                        "ε = 0: the attack changes inputs it must not change, or clean and adversarial evaluation "
                        "differ (randomness in the model?)"})
    reasons = {"monotone_in_eps": "robust accuracy rises with ε: possible gradient masking or a broken evaluation",
               "pgd_not_weaker_than_fgsm": "the iterative attack is weaker than one step: possible gradient masking",
               "more_steps_not_weaker": "more steps find fewer adversarial examples: possible gradient masking"}
    for check, attack, pairs in planned:
        bad, shown = [], []
        for weaker, stronger, what in pairs:
            result, text = _compare(weaker, stronger, threshold, tolerance)
            shown.append(f"{what}: {text}")
            if result:
                bad.append(f"{what}: {text}")
        out.append({"check": check, "attack": attack, "passed": not bad,
                    "test": test if all(_mask(w) and _mask(s_) for w, s_, _ in pairs) else
                    f"robust accuracies compared, tolerance {tolerance:g}",
                    "detail": "; ".join(bad) + f": {reasons[check]}" if bad else "; ".join(shown)})
    return out


def _single_run(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The row as its own run alone (undoing ``_keep_best_of_both`` where it was applied)."""
    if "single_run_robust_accuracy" not in row:
        return row
    return {**row, "robust_accuracy": row["single_run_robust_accuracy"],
            "robust_per_image": row.get("single_run_per_image")}


def _compare(weaker: Mapping[str, Any], stronger: Mapping[str, Any], threshold: float,
             tolerance: float) -> tuple[bool, str]:
    """(fails, description): whether the run that should be ``stronger`` is significantly weaker than ``weaker``."""
    from scipy.stats import binomtest

    weak, strong = _mask(weaker), _mask(stronger)  # robust under each run, per image
    if weak is None or strong is None or len(weak) != len(strong):
        fails = stronger["robust_accuracy"] > weaker["robust_accuracy"] + tolerance
        return fails, f"robust accuracy {weaker['robust_accuracy']:.4f} vs {stronger['robust_accuracy']:.4f}"
    only_weak = sum(s and not w for w, s in zip(weak, strong))  # broken only by the run that should be weaker
    only_strong = sum(w and not s for w, s in zip(weak, strong))
    p = binomtest(only_weak, only_weak + only_strong, 0.5, alternative="greater").pvalue if only_weak else 1.0
    return p <= threshold, (f"robust accuracy {weaker['robust_accuracy']:.4f} vs {stronger['robust_accuracy']:.4f}; "
                            f"{only_weak} images broken only by the first, {only_strong} only by the second "
                            f"(p = {p:.2g})")
