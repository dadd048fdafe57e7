"""The one model factory: timm's registry, made trainable with DP-SGD.

``create_model(name, num_classes, ...)`` accepts any timm model name plus fedvision's own small models
(``OWN_MODELS``, built without importing timm, and registered into timm's registry as soon as fedvision loads
timm, so ``timm.create_model`` sees them too). With ``dp=True`` the model is
rewritten so that per-sample gradients (``fedvision.per_sample``) are exact:

* every BatchNorm variant (``nn.BatchNorm*``, timm's ``BatchNormAct2d``) becomes GroupNorm with the
  same affine shape, keeping a fused activation where there was one: BatchNorm mixes samples in a batch,
  so per-sample gradients (and the DP guarantee) would be meaningless with it;
* in-place activations are made out-of-place and ``x += shortcut``-style in-place adds in ``forward``
  become out-of-place: the per-sample hooks keep each layer's output gradient, so outputs are not modified
  in place;
* ``nn.MultiheadAttention`` becomes Opacus's ``DPMultiheadAttention``.

A model family that cannot be made compatible is refused at creation with a one-line reason.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from fedvision.dp import check_per_sample_gradients
from fedvision.errors import ModelError
from fedvision.io import atomic_write

MODEL_FORMAT = "fedvision-model/1"

# Families whose forward folds several pieces of one image into the batch dimension *and* owns parameters
# that only torch.func can give per-sample gradients for, with the shift mask passed as a keyword: refused at
# creation. Our own window-attention model is the supported alternative.
UNSUPPORTED_FOR_DP = {
    "swin": "timm's Swin folds attention windows into the batch dimension and passes the shift mask as a "
    "keyword, so per-sample gradients cannot be computed for its attention; use 'fedvision_swin' (window attention "
    "built for DP) instead",
    "swinv2": "same limitation as timm's Swin; use 'fedvision_swin'",
}


# --------------------------------------------------------------------------------------------------------
# fedvision's own models, registered in timm's registry
# --------------------------------------------------------------------------------------------------------
# timm is imported only when a timm architecture is asked for: with torchvision it costs about 3 s per process,
# and every Flower ClientApp process of a deployed site (one per message) would pay it for fedvision's own models.
OWN_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register one of fedvision's models under its function name (and in timm's registry once timm loads)."""
    OWN_MODELS[fn.__name__] = fn
    return fn


def _timm():
    """timm, with fedvision's own models registered in its registry (``timm.create_model`` sees them too)."""
    import timm
    from timm.models import register_model as timm_register

    for name, fn in OWN_MODELS.items():
        if not timm.is_model(name):
            timm_register(fn)
    return timm


def loaded_timm_class(module: str, name: str) -> type | tuple:
    """A timm class when timm is loaded, else ``()`` (which ``isinstance`` never matches): a model built
    without importing timm contains no timm layer."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else ()


def _groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is ≤ max_groups (GroupNorm needs channels % groups == 0)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class SmallCNN(nn.Module):
    """A small GroupNorm CNN for tiny images (8×8 digits, 28×28 MedMNIST, 32×32 synthetic-derm).

    Two conv stages and global average pooling, so any input ≥ 4×4 works. Tanh activations: bounded
    activations keep per-sample gradient norms small, which helps DP-SGD (Papernot et al., 2021).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32, **_: Any):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1), nn.GroupNorm(_groups(w, 8), w), nn.Tanh(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(_groups(w, 8), w), nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(_groups(2 * w, 8), 2 * w), nn.Tanh(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(2 * w * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_model
def fedvision_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    kwargs.pop("img_size", None)
    return SmallCNN(**kwargs)


class _RelativePositionBias(nn.Module):
    """Learned relative position bias added to window-attention logits of shape (B, nW, heads, N, N).

    Its own module, taking the logits as its positional input, so its per-sample gradient comes from
    torch.func over the real batch dimension (fedvision.per_sample), at the cost of this small module alone.
    """

    def __init__(self, window: int, heads: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        # A plain attribute (moved to the logits' device on use), so it never enters a state dict.
        self.index = (rel[..., 0] * (2 * window - 1) + rel[..., 1]).reshape(-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[-1]
        index = self.index.to(logits.device)
        bias = self.table[index].reshape(n, n, -1).permute(2, 0, 1)
        return logits + bias


class _WindowBlock(nn.Module):
    """Swin block: (shifted) window multi-head self-attention + MLP, windows kept out of the batch dim."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, resolution: int):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_bias = _RelativePositionBias(window, heads)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        mask = torch.zeros(1, 1, 1, window * window, window * window)
        if shift:
            # Standard Swin mask: after the cyclic shift, tokens from different image regions that land in
            # one window must not attend to each other.
            region = torch.zeros(resolution, resolution)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            label = 0
            for hs in cuts:
                for ws in cuts:
                    region[hs, ws] = label
                    label += 1
            r = self._partition(region[None, :, :, None])[0, :, :, 0]  # (nW, N)
            mask = (r[:, None, :] != r[:, :, None]).float() * -1e4
            mask = mask[None, :, None]  # (1, nW, 1, N, N)
        self.register_buffer("mask", mask, persistent=False)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        x = x.reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // s) * (w // s), s * s, c)  # (B, nW, N, C)

    def _merge(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, _, c = x.shape
        s = self.window
        x = x.reshape(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self._partition(y)
        nw, n = y.shape[1], y.shape[2]
        qkv = self.qkv(y).reshape(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nW, heads, N, d)
        logits = self.rel_bias((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)) + self.mask
        y = (logits.softmax(-1) @ v).permute(0, 1, 3, 2, 4).reshape(b, nw, n, c)
        y = self._merge(self.proj(y), h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class WindowAttentionNet(nn.Module):
    """A compact Swin-style classifier (patch embedding, W-MSA/SW-MSA blocks, patch merging) for small
    inputs, written so every layer sees the real batch dimension (what per-sample gradients need)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, patch_size: int = 2,
                 window: int = 4, dims: tuple[int, ...] = (48, 96), heads: tuple[int, ...] = (3, 6), **_: Any):
        super().__init__()
        res = img_size // patch_size
        if img_size % patch_size or res % window:
            raise ModelError(f"fedvision_swin: img_size {img_size} must be a multiple of "
                             f"patch_size×window = {patch_size}×{window}")
        self.patch_embed = nn.Conv2d(in_chans, dims[0], patch_size, stride=patch_size)
        stages = []
        for i, (dim, nh) in enumerate(zip(dims, heads)):
            if i:
                stages.append(_PatchMerging(dims[i - 1], dim))
                res //= 2
            win = min(window, res)
            shift = win // 2 if res > win else 0
            stages += [_WindowBlock(dim, nh, win, 0, res), _WindowBlock(dim, nh, win, shift, res)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.stages(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


@register_model
def fedvision_swin(pretrained: bool = False, **kwargs: Any) -> WindowAttentionNet:
    kwargs.setdefault("img_size", 32)
    return WindowAttentionNet(**kwargs)


class ScatterNet(nn.Module):
    """Handcrafted features, then a linear classifier (Tramèr & Boneh, "Differentially Private Learning Needs
    Better Features", ICLR 2021).

    A fixed scattering transform (kymatio's ``Scattering2D``: Morlet wavelets, ``scales`` scales, ``angles``
    angles) has no trainable parameter, so it costs no privacy; only the linear head is trained. Far fewer
    parameters than a CNN means far less DP noise (its norm grows with √parameters), which is what wins at
    ε ≤ 8 on small data. The transform is differentiable, so the audit's gradient attacks see through it.

    Two choices between the transform and the head decide what DP-SGD can learn (issue 13, measured on the
    demo at ε = 8):

    * Each scattering channel is normalised per image (GroupNorm with one group per channel, no affine
      parameters; per sample, so data-independent across records). With groups of 9 channels, as in the
      paper, 96 % of the features' energy was one vector shared by every image: the isotropic DP noise then
      moved every logit together, the decision threshold swung from round to round (central accuracy fell
      back to the majority class's 0.53 in some rounds) and the demo plateaued at 0.70–0.72. Per channel,
      the shared part is 22 %, and the demo reaches 0.755–0.783.
    * The normalised features are average-pooled to a ``grid`` × ``grid`` map (4 × 4: 16× fewer head
      weights on the demo's 16 × 16 maps, so a noise norm 4× smaller). With per-image groups of 9 channels
      pooling lost the signal; per channel it does not (non-private ceiling 0.797 over three seeds, against
      0.785 unpooled with groups of 9). README, "Private training that learns", has the runs.

    One scale by default (the paper uses two on CIFAR-10): on the demo's 32×32 images it scored as well as two
    (ε = 8, one scale vs two: quick demo 0.68–0.70 in three runs vs 0.68 in one, full demo 0.745 and 0.757 vs
    0.702) and runs 5× faster (1,150 vs 215 images/s forward on 2 cores), which the certification's many noisy
    forward passes feel most.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, scales: int = 1, angles: int = 8,
                 grid: int = 4, **_: Any):
        super().__init__()
        # kymatio's 2D torch frontend only (``kymatio.torch`` also loads the 3D transform, which needs a scipy
        # function that scipy ≥ 1.15 no longer has).
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        if img_size % 2 ** scales:
            raise ModelError(f"fedvision_scatternet: img_size {img_size} must be a multiple of 2^scales = "
                             f"{2 ** scales}")
        self.scattering = ScatteringTorch2D(J=scales, shape=(img_size, img_size), L=angles)
        # The wavelet filters are constants rebuilt at creation: keep them out of the state dict (and so out of
        # every update a site sends), in the parameters' dtype (kymatio builds float32 ones).
        for name, buffer in list(self.scattering.named_buffers(recurse=False)):
            delattr(self.scattering, name)
            if buffer.is_floating_point():
                buffer = buffer.to(torch.get_default_dtype())
            self.scattering.register_buffer(name, buffer, persistent=False)
        per_channel = 1 + angles * scales + angles ** 2 * scales * (scales - 1) // 2
        channels = in_chans * per_channel
        self.norm = nn.GroupNorm(channels, channels, affine=False)
        side = min(grid, img_size // 2 ** scales)  # maps already smaller than the grid are left as they are
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.head = nn.Linear(channels * side * side, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: normalised, pooled scattering coefficients, (B, channels × side²)."""
        scattered = self.scattering(x.contiguous())  # kymatio refuses strided views: (B, C, per_channel, H', W')
        scattered = scattered.reshape(x.shape[0], -1, *scattered.shape[-2:])
        return self.pool(self.norm(scattered)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def fedvision_scatternet(pretrained: bool = False, **kwargs: Any) -> ScatterNet:
    kwargs.setdefault("img_size", 32)
    return ScatterNet(**kwargs)


# --------------------------------------------------------------------------------------------------------
# DP conversion
# --------------------------------------------------------------------------------------------------------
class _GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by the dropout and activation that a timm ``BatchNormAct2d`` carried."""

    def __init__(self, bn: nn.Module):  # timm's BatchNormAct2d
        super().__init__(_groups(bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
        self.drop = bn.drop
        self.act = bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _replace_batchnorm(module: nn.Module) -> None:
    batchnorm_act = loaded_timm_class("timm.layers", "BatchNormAct2d")
    for name, child in module.named_children():
        if isinstance(child, batchnorm_act):
            gn = _GroupNormAct(child)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            gn = nn.GroupNorm(_groups(child.num_features), child.num_features, eps=child.eps, affine=child.affine)
        else:
            _replace_batchnorm(child)
            continue
        if child.affine:
            # Keep the architecture's initialisation of the affine parameters: timm zero-initialises the last
            # norm of each residual branch, without which deep nets start with exploding gradients.
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
        setattr(module, name, gn)


def _disable_inplace(module: nn.Module) -> None:
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False


def _resnet_basic_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm BasicBlock.forward with ``x = x + shortcut`` instead of ``x += shortcut``."""
    branch = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return _add_shortcut(self, self.bn2(self.conv2(branch)), x, self.act2)


def _resnet_bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm Bottleneck.forward with ``x = x + shortcut`` instead of ``x += shortcut``."""
    branch = self.act1(self.bn1(self.conv1(x)))
    branch = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(branch)))))
    return _add_shortcut(self, self.bn3(self.conv3(branch)), x, self.act3)


def _add_shortcut(block: nn.Module, branch: torch.Tensor, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    if block.se is not None:
        branch = block.se(branch)
    if block.drop_path is not None:
        branch = block.drop_path(branch)
    shortcut = block.downsample(x) if block.downsample is not None else x
    return act(branch + shortcut)


@functools.cache
def _resnet_swaps() -> dict[type, type]:
    """timm's ResNet blocks → subclasses whose forward adds the shortcut out of place (module-level names,
    so pickling finds them)."""
    from timm.models.resnet import BasicBlock, Bottleneck

    swaps = {}
    for base, forward in ((BasicBlock, _resnet_basic_forward), (Bottleneck, _resnet_bottleneck_forward)):
        name = f"_DP{base.__name__}"
        swaps[base] = globals()[name] = type(name, (base,), {"forward": forward, "__module__": __name__})
    return swaps


def _out_of_place_residuals(model: nn.Module) -> None:
    """Swap the class of blocks that add the shortcut in place onto a hooked layer's output (timm ResNet).

    A class swap (not an instance attribute) so the fix survives ``copy.deepcopy`` and pickling."""
    if "timm.models.resnet" not in sys.modules:
        return  # no timm ResNet block can be in the model
    swaps = _resnet_swaps()
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]


def make_dp_compatible(model: nn.Module, name: str = "model") -> nn.Module:
    """Rewrite ``model`` in place for DP-SGD; raise ModelError with the reason if it cannot be. Opacus's
    validator names what would mix samples (BatchNorm, running statistics) that the rewrite did not fix."""
    from opacus.validators import ModuleValidator

    _replace_batchnorm(model)
    _disable_inplace(model)
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        model = ModuleValidator.fix(model)
    _out_of_place_residuals(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ModelError(f"model '{name}' cannot be trained with DP-SGD: {errors[0]}")
    return model


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def _timm_model(name: str, num_classes: int, in_chans: int, img_size: int | None, kwargs: dict) -> nn.Module:
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 **_size_kwargs(name, img_size), **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        # Convolutional families take any input size and have no img_size argument.
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789.") if not name.startswith("fedvision") else name


def _size_kwargs(name: str, img_size: int | None) -> dict[str, Any]:
    """img_size for architectures that take it; small-image ViTs also get a patch size giving a token grid."""
    if img_size is None:
        return {}
    kwargs: dict[str, Any] = {"img_size": img_size}
    if name.split("_")[0] in {"vit", "deit", "deit3"} and img_size < 224:
        kwargs["patch_size"] = 4 if img_size <= 64 else 8
    return kwargs


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int | None = None,
                 dp: bool = True, **kwargs: Any) -> nn.Module:
    """Create ``name`` from timm's registry (randomly initialised: no weights are downloaded).

    ``img_size`` is passed to architectures that take it (ViT/DeiT also get a patch size that suits small
    images); ``dp=True`` makes the model trainable with DP-SGD (see the module docstring).
    """
    if not isinstance(name, str) or (name not in OWN_MODELS and not _timm().is_model(name)):
        raise ModelError(f"unknown model '{name}': not in timm's registry (see timm.list_models())")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"in_chans must be a positive integer, got {in_chans!r}")
    if img_size is not None and (not isinstance(img_size, int) or img_size < 4):
        raise ModelError(f"img_size must be an integer ≥ 4, got {img_size!r}")
    family = _family(name)
    if dp and family in UNSUPPORTED_FOR_DP:
        raise ModelError(f"model '{name}' cannot be trained with DP-SGD: {UNSUPPORTED_FOR_DP[family]}")

    try:
        if name in OWN_MODELS:
            model = OWN_MODELS[name](num_classes=num_classes, in_chans=in_chans, **_size_kwargs(name, img_size),
                                     **kwargs)
        else:
            model = _timm_model(name, num_classes, in_chans, img_size, kwargs)
    except ModelError:
        raise
    except Exception as e:  # timm raises many types for bad combinations; surface one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot create model '{name}' with num_classes={num_classes}, in_chans={in_chans}, "
                         f"img_size={img_size}: {reason}") from e
    if dp:
        model = make_dp_compatible(model, name)
        check_per_sample_gradients(model, (in_chans, *_probe_size(model, img_size)), name)
    model.fedvision_meta = {"architecture": name, "num_classes": num_classes, "in_chans": in_chans,
                            "img_size": img_size, "dp": dp, "model_kwargs": dict(kwargs)}
    return model


def _probe_size(model: nn.Module, img_size: int | None) -> tuple[int, int]:
    """Input size for the creation-time DP probe: the model's own if fixed (ViT), else img_size or 32."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if img_size is None and cfg.get("fixed_input_size") and cfg.get("input_size"):
        return tuple(cfg["input_size"][-2:])
    return (img_size or 32, img_size or 32)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names and values: identifies one set of weights across processes and machines."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_model(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save weights with everything ``create_model`` needs to rebuild the model, atomically.

    ``meta`` adds to (and overrides) what ``create_model`` recorded, e.g. ``{"class_names": [...]}``.
    """
    base = dict(getattr(model, "fedvision_meta", {}))
    base.update(meta or {})
    missing = [k for k in ("architecture", "num_classes") if k not in base]
    if missing:
        raise ModelError(f"save_model needs {', '.join(missing)} in meta (model not made by create_model?)")
    base.setdefault("in_chans", 3)
    base.setdefault("img_size", None)
    base.setdefault("dp", True)
    base.setdefault("class_names", [str(i) for i in range(base["num_classes"])])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "meta": base, "state_dict": state}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by ``save_model``; its metadata is on ``model.fedvision_meta``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: not a readable fedvision model file ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path}: not a fedvision model file (expected format {MODEL_FORMAT})")
    meta = payload["meta"]
    model = create_model(meta["architecture"], meta["num_classes"], in_chans=meta.get("in_chans", 3),
                         img_size=meta.get("img_size"), dp=meta.get("dp", True), **meta.get("model_kwargs", {}))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not match architecture '{meta['architecture']}'") from e
    model.fedvision_meta = meta
    return model

