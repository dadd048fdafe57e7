"""Per-sample gradient clipping in one backward pass (book-keeping with mixed ghost norms; Bu et al. 2022–23).

DP-SGD needs Σᵢ min(1, C/‖gᵢ‖)·gᵢ, where gᵢ is sample i's gradient over *all* parameters. Opacus's hooks build
every layer's per-sample gradients (B × the layer's size in memory, for every layer) and then clip them. Here
one backward pass records each layer's input a and output gradient g, and then, layer by layer:

* the per-sample norm ‖gᵢ‖² of the layer's weights comes from whichever is cheaper: the explicit per-sample
  gradient, or the *ghost norm* ⟨aᵢaᵢᵀ, gᵢgᵢᵀ⟩ (Goodfellow 2015; Li et al. 2022), which never forms it: for a
  layer applied at T positions with d inputs and p outputs, ghost costs T²(d + p) and explicit T·d·p;
* once every layer's norms are summed into ‖gᵢ‖ and the clip factors cᵢ are known, the clipped sum is the
  layer's ordinary weight gradient with gᵢ scaled by cᵢ (or Σᵢ cᵢ·gradᵢ where the per-sample gradient was
  formed anyway), so no second backward pass is needed (book-keeping, Bu et al. 2023).

The backward pass asks autograd only for the gradients of the layers' outputs, so it never computes the
unclipped weight gradients that would be thrown away, nor goes below the first layer that owns parameters.

Layers with a closed form here: ``nn.Linear``, ``nn.Conv2d`` (zero padding, any groups), ``nn.GroupNorm`` and
``nn.LayerNorm`` (timm's ``LayerNorm``/``LayerNorm2d`` too). Any other module that owns parameters gets exact
per-sample gradients from ``torch.func`` (vmap of the module's vector-Jacobian product over the batch).
Layers that fold several rows per image into the batch (row ``b·k + j`` belongs to image ``b``, as MobileViT
does) are summed back to one gradient per image. The result is exact: the float64 test in tests/test_models.py
compares it with each example's gradient computed alone, for every model family.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedvision.errors import ModelError
from fedvision.models import loaded_timm_class


class _Record:
    """One call of a layer during the forward pass: its inputs, then the gradient of its output."""

    __slots__ = ("args", "kwargs", "output", "grad")

    def __init__(self, args, kwargs, output):
        self.args, self.kwargs, self.output, self.grad = args, kwargs, output, None


class PerSampleClipper:
    """Hooks on every module of ``model`` that owns trainable parameters. Use::

        clipper = PerSampleClipper(model)
        losses = F.cross_entropy(clipper(x), y, reduction="none")   # one loss per sample
        clipper.clipped_backward(losses, max_grad_norm)            # p.grad = Σᵢ cᵢ ∇ℓᵢ for every parameter
        clipper.close()

    ``per_sample_norms(losses)`` returns ‖∇ℓᵢ‖ without touching ``p.grad`` (tests, diagnostics).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._recording = False
        self._records: dict[nn.Module, list[_Record]] = {}
        # (layer, its own trainable parameters, which closed form computes its per-sample gradients)
        self._layers: list[tuple[nn.Module, list[tuple[str, nn.Parameter]], str | None]] = []
        self._handles = []
        for module in model.modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                self._layers.append((module, own, _closed_form(module)))
                self._handles.append(module.register_forward_hook(self._save, with_kwargs=True))

    # -- recording ------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._records = {}
        self._batch = len(x)
        self._device = x.device
        self._recording = True
        try:
            return self.model(x, *args, **kwargs)
        finally:
            self._recording = False

    def _save(self, module, args, kwargs, output):
        if not self._recording or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"{type(module).__name__} returns {type(output).__name__}: per-sample clipping needs "
                             "layers that own parameters to return one tensor")
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self._records.setdefault(module, []).append(_Record(args, kwargs, output))

    def _backward(self, losses: torch.Tensor) -> None:
        if losses.dim() != 1 or len(losses) != self._batch:
            raise ValueError(f"need one loss per sample ({self._batch}), got shape {tuple(losses.shape)}")
        records = [r for rs in self._records.values() for r in rs if r.output.requires_grad]
        if self._batch and records:
            # Gradients of the layers' outputs only: autograd computes no parameter gradient, and goes no deeper
            # than the first layer that owns parameters (not through a fixed front end such as a ScatterNet's).
            grads = torch.autograd.grad(losses.sum(), [r.output for r in records], allow_unused=True)
            for r, g in zip(records, grads):
                r.grad = g
        for rs in self._records.values():
            for r in rs:
                r.output = None  # the graph can go

    # -- per-sample norms and clipped sums ------------------------------------------------------------------
    def per_sample_norms(self, losses: torch.Tensor) -> torch.Tensor:
        """‖∇ℓᵢ‖ over all trainable parameters, for the losses of the last forward; ``.grad`` is left alone."""
        self._backward(losses)
        return self._layer_work()[0].sqrt()

    def clipped_backward(self, losses: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Set every trainable parameter's ``.grad`` to Σᵢ min(1, C/‖∇ℓᵢ‖)·∇ℓᵢ; returns the per-sample norms."""
        self._backward(losses)
        squared, finish = self._layer_work()
        norms = squared.sqrt()
        scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for done in finish:
            done(scale)
        return norms

    def _layer_work(self):
        """Sum of squared per-sample norms over layers, and per layer a function of the clip factors that writes
        the clipped gradient sum into ``.grad``."""
        B = self._batch
        dtype = next((p.dtype for _, own, _ in self._layers for _, p in own), torch.float32)
        squared = torch.zeros(B, dtype=dtype, device=self._device)
        finish = []
        for module, own, kind in self._layers:
            records = [r for r in self._records.get(module, []) if r.grad is not None]
            if not records or B == 0:
                finish.append(_zero_grads(own))
                continue
            try:
                layer_squared, done = _layer(module, kind, own, records, B)
            except ModelError:
                raise
            except Exception as e:  # a layer the closed forms or torch.func cannot handle: one line, named
                reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
                raise ModelError(f"per-sample gradients failed in {type(module).__name__}: {reason}") from e
            squared += layer_squared
            finish.append(done)
        self._records = {}
        return squared, finish

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._records = [], {}


def _zero_grads(own):
    def done(scale):
        for _, p in own:
            p.grad = torch.zeros_like(p)
    return done


def _rows_per_image(rows: int, B: int) -> int:
    if rows % B:
        raise ModelError(f"a layer saw {rows} rows for a batch of {B}: the model mixes samples across the batch")
    return rows // B


def _fold(t: torch.Tensor, B: int) -> torch.Tensor:
    """Rows of a folded batch (row b·k + j belongs to image b) summed to one row per image."""
    k = _rows_per_image(t.shape[0], B)
    return t if k == 1 else t.reshape(B, k, *t.shape[1:]).sum(1)


def _layer(module, kind, own, records, B):
    """(per-sample squared norm of ``module``'s own parameters, function of the clip factors writing .grad)."""
    single = len(records) == 1
    rec = records[0]
    if single and kind == "linear":
        return _linear(module, rec.args[0], rec.grad, B)
    if single and kind == "conv":
        return _conv(module, rec.args[0], rec.grad, B)
    # Everything else, and layers called more than once (whose calls' gradients add up before the norm):
    # explicit per-sample gradients.
    per_sample = {name: 0 for name, _ in own}
    for r in records:
        for name, g in _explicit(module, kind, own, r).items():
            per_sample[name] = per_sample[name] + _fold(g, B)
    return _from_explicit(own, per_sample)


def _closed_form(module) -> str | None:
    """The closed form for ``module``'s per-sample gradients, or None (torch.func). Exact types only: a subclass
    may change what forward computes."""
    if type(module) is nn.Conv2d:
        return "conv" if module.padding_mode == "zeros" and not isinstance(module.padding, str) else None
    kinds = {nn.Linear: "linear", nn.GroupNorm: "groupnorm", nn.LayerNorm: "layernorm",
             loaded_timm_class("timm.layers.norm", "LayerNorm"): "layernorm",
             loaded_timm_class("timm.layers.norm", "LayerNorm2d"): "layernorm2d"}
    return kinds.get(type(module))


def _from_explicit(own, per_sample):
    B = next(iter(per_sample.values())).shape[0]
    squared = sum(g.reshape(B, -1).pow(2).sum(1) for g in per_sample.values())

    def done(scale):
        for name, p in own:
            p.grad = torch.einsum("b,b...->...", scale.to(p.dtype), per_sample[name]).reshape(p.shape)
    return squared, done


# -- Linear: y = a Wᵀ + b over T positions ---------------------------------------------------------------
def _linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, B: int):
    d, p = module.in_features, module.out_features
    _rows_per_image(a.shape[0], B)
    a = a.reshape(B, -1, d)  # a folded batch (k·B rows) becomes k·T positions per image
    g = g.reshape(B, -1, p)
    T = a.shape[1]
    if T == 1:
        weight_sq = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    elif T * (d + p) < d * p:  # ghost norm: ⟨aᵢaᵢᵀ, gᵢgᵢᵀ⟩, never forms the p×d per-sample gradient
        weight_sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    else:
        weight_sq = torch.einsum("btp,btd->bpd", g, a).pow(2).sum((1, 2))
    squared = weight_sq
    if module.bias is not None and module.bias.requires_grad:
        squared = squared + g.sum(1).pow(2).sum(1)

    def done(scale):
        gc = g * scale.to(g.dtype)[:, None, None]
        if module.weight.requires_grad:
            module.weight.grad = gc.reshape(-1, p).t() @ a.reshape(-1, d)
        if module.bias is not None and module.bias.requires_grad:
            module.bias.grad = gc.sum((0, 1))
    return squared, done


# -- Conv2d: a linear layer on the unfolded input ----------------------------------------------------------
def _unfold(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def _conv_per_sample(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row weight gradients (rows, *weight.shape) as one weight gradient of a convolution with the batch
    folded into the channels (groups × rows): the convolution backward kernel, no unfolded copy of the input."""
    rows = a.shape[0]
    w = torch.nn.grad.conv2d_weight(
        a.reshape(1, -1, *a.shape[2:]), (rows * module.out_channels, *module.weight.shape[1:]),
        g.reshape(1, -1, *g.shape[2:]), stride=module.stride, padding=module.padding, dilation=module.dilation,
        groups=rows * module.groups)
    return w.reshape(rows, *module.weight.shape)


def _conv_bias_per_row(g: torch.Tensor) -> torch.Tensor:
    return g.flatten(2).sum(2)


def _conv(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, B: int):
    rows, cout, groups = a.shape[0], module.out_channels, module.groups
    go = g.reshape(rows, cout, -1)  # (rows, p, T)
    T = go.shape[2]
    d = module.in_channels // groups * module.kernel_size[0] * module.kernel_size[1]
    bias = module.bias is not None and module.bias.requires_grad
    ghost = groups == 1 and rows == B and T * (d + cout) < d * cout
    if ghost:
        u = _unfold(module, a)  # (B, d, T)
        weight_sq = (torch.bmm(u.transpose(1, 2), u) * torch.bmm(go.transpose(1, 2), go)).sum((1, 2))
        per_sample = None
    else:
        per_sample = _fold(_conv_per_sample(module, a, g), B)
        weight_sq = per_sample.pow(2).sum((1, 2, 3, 4))
    bias_sample = _fold(_conv_bias_per_row(g), B) if bias else None
    squared = weight_sq + (bias_sample.pow(2).sum(1) if bias else 0)

    def done(scale):
        s = scale.to(g.dtype)
        if module.weight.requires_grad:
            if per_sample is not None:
                module.weight.grad = torch.einsum("b,b...->...", s, per_sample)
            else:  # the layer's ordinary weight gradient, each sample's output gradient scaled by its factor
                module.weight.grad = torch.nn.grad.conv2d_weight(
                    a, module.weight.shape, g * s.reshape(-1, *[1] * (g.dim() - 1)), stride=module.stride,
                    padding=module.padding, dilation=module.dilation, groups=groups)
        if bias:
            module.bias.grad = s @ bias_sample
    return squared, done


# -- explicit per-sample gradients: norms in closed form, anything else through torch.func ----------------
def _explicit(module, kind, own, record) -> dict[str, torch.Tensor]:
    a, g = record.args[0] if record.args else None, record.grad
    if kind == "linear":
        a2, g2 = a.reshape(len(a), -1, module.in_features), g.reshape(len(g), -1, module.out_features)
        out = {"weight": torch.einsum("btp,btd->bpd", g2, a2)}
        if module.bias is not None:
            out["bias"] = g2.sum(1)
        return _only(out, own)
    if kind == "conv":
        out = {"weight": _conv_per_sample(module, a, g)}
        if module.bias is not None:
            out["bias"] = _conv_bias_per_row(g)
        return _only(out, own)
    if kind in ("groupnorm", "layernorm", "layernorm2d"):
        if kind == "groupnorm":
            normed, channel_dims = F.group_norm(a, module.num_groups, eps=module.eps), (1,)
        elif kind == "layernorm":
            normed = F.layer_norm(a, module.normalized_shape, eps=module.eps)
            channel_dims = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
        else:
            normed = F.layer_norm(a.permute(0, 2, 3, 1), module.normalized_shape, eps=module.eps).permute(0, 3, 1, 2)
            channel_dims = (1,)
        reduce = [i for i in range(1, a.dim()) if i not in channel_dims]
        out = {"weight": (normed * g).sum(reduce) if reduce else normed * g}
        out["bias"] = g.sum(reduce) if reduce else g
        return _only(out, own)
    return _functorch(module, own, record)


def _only(out, own):
    return {name: out[name] for name, _ in own}


def _functorch(module, own, record) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of ``module``'s own parameters: vmap over the batch of the vector-Jacobian
    product of one sample's forward (the module's children keep their parameters fixed)."""
    from torch.func import functional_call, vjp, vmap

    params = {name: p.detach() for name, p in own}
    batched = [i for i, x in enumerate(record.args) if isinstance(x, torch.Tensor)]
    if any(isinstance(v, torch.Tensor) for v in record.kwargs.values()):
        raise ModelError(f"{type(module).__name__} takes a tensor keyword argument: per-sample gradients need "
                         "its tensors passed positionally")
    rows = record.grad.shape[0]
    if any(record.args[i].shape[0] != rows for i in batched):
        raise ModelError(f"{type(module).__name__}: inputs and output disagree on the batch dimension")

    def one(tensors, grad):
        args = list(record.args)
        for i, t in zip(batched, tensors):
            args[i] = t.unsqueeze(0)
        _, pullback = vjp(lambda p: functional_call(module, p, tuple(args), record.kwargs), params)
        return pullback(grad.unsqueeze(0))[0]

    # Our forward hooks see the re-run but record nothing: recording is off outside PerSampleClipper.__call__.
    # no_grad: the children's parameters must not build a graph behind the result (torch.func ignores it).
    with torch.no_grad():
        return vmap(one)(tuple(record.args[i] for i in batched), record.grad)

