"""Book-keeping per-sample clipping (fedvision.per_sample) against each example's gradient computed alone.

The model families are checked end to end in tests/test_models.py; here each route of the engine is forced on
its own: ghost and explicit norms for linear and conv layers (shapes chosen on either side of the cost rule),
a layer called twice, a layer that folds pieces of an image into the batch, a parameter only torch.func can
handle, a parameter that gets no gradient, and an empty Poisson batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedvision.errors import ModelError
from fedvision.per_sample import PerSampleClipper


class _Scale(nn.Module):
    """A parameter with no closed form here: per-sample gradients come from torch.func."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.gamma.reshape(1, -1, 1, 1)


class EveryRoute(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # T = 64, d = 27, p = 8: explicit (T(d+p) > dp)
        self.norm = nn.GroupNorm(2, 8)
        self.scale = _Scale(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # groups > 1: explicit
        self.wide = nn.Conv2d(8, 64, 3, stride=4, padding=1)  # T = 4, d = 72, p = 64: ghost
        self.tokens = nn.Linear(64, 32)  # T = 4 positions, d = 64, p = 32: ghost (T(d+p) = 384 < 2048)
        self.narrow = nn.Linear(32, 4)  # T = 4, d = 32, p = 4: explicit (T(d+p) = 144 > 128)
        self.ln = nn.LayerNorm(4)
        self.folded = nn.Linear(4, 4)  # these two see 2 rows per image (pieces folded into the batch)
        self.folded_norm = nn.LayerNorm(4)
        self.twice = nn.Linear(4, 4)  # called twice: its calls' gradients add up before the norm
        self.head = nn.Linear(16, 3)  # T = 1: ghost
        self.unused = nn.Linear(3, 3)  # owns parameters, never called: zero gradient

    def forward(self, x):
        B = len(x)
        x = torch.tanh(self.scale(self.norm(self.stem(x))))
        x = torch.tanh(self.wide(self.depthwise(x)))  # (B, 64, 2, 2)
        x = x.reshape(B, 4, 64)  # 4 positions of 64 features
        x = self.ln(self.narrow(torch.tanh(self.tokens(x))))  # (B, 4, 4)
        pieces = x.reshape(B * 2, 2, 4)  # row b·2 + j belongs to image b
        x = torch.tanh(self.folded_norm(self.folded(pieces))).reshape(B, 4, 4)
        x = self.twice(torch.tanh(self.twice(x)))
        return self.head(x.reshape(B, 16))


def _per_example(model, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(grads)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_every_route_gives_the_exact_clipped_sum(float64):
    torch.manual_seed(0)
    model = EveryRoute()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    reference = _per_example(model, x, y)
    norms = reference.norm(dim=1)
    clip = float(norms.median())  # half the examples are clipped
    expected = (reference * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0)

    clipper = PerSampleClipper(model)
    got_norms = clipper.clipped_backward(F.cross_entropy(clipper(x), y, reduction="none"), clip)
    clipper.close()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got_norms, norms, rtol=1e-10, atol=0)
    assert float((got - expected).norm() / expected.norm()) < 1e-10
    assert torch.count_nonzero(model.unused.weight.grad) == 0 and model.unused.weight.grad.shape == (3, 3)


def test_norms_alone_leave_the_gradients_untouched(float64):
    torch.manual_seed(1)
    model = EveryRoute()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([2, 1, 0])
    reference = _per_example(model, x, y).norm(dim=1)
    clipper = PerSampleClipper(model)
    assert torch.allclose(clipper.per_sample_norms(F.cross_entropy(clipper(x), y, reduction="none")), reference,
                          rtol=1e-10, atol=0)
    assert all(p.grad is None for p in model.parameters())
    clipper.close()
    assert all(not m._forward_hooks_with_kwargs for m in model.modules())  # close() removes every hook


def test_a_sample_gets_no_more_than_the_clip_bound_whatever_its_gradient():
    """The guarantee itself: one example with a huge loss moves the sum by at most C."""
    torch.manual_seed(2)
    model = EveryRoute()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    clipper = PerSampleClipper(model)
    clipper.clipped_backward(F.cross_entropy(clipper(x[1:]), y[1:], reduction="none"), 0.1)
    without = torch.cat([p.grad.flatten() for p in model.parameters()])
    x[0] *= 1e3  # an outlier
    losses = F.cross_entropy(clipper(x), y, reduction="none") * 1e3
    norms = clipper.clipped_backward(losses, 0.1)
    with_outlier = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(norms[0]) > 100
    assert float((with_outlier - without).norm()) <= 0.1 * (1 + 1e-4)


def test_an_empty_batch_gives_zero_gradients():
    model = EveryRoute()
    clipper = PerSampleClipper(model)
    x = torch.zeros(0, 3, 8, 8)
    norms = clipper.clipped_backward(F.cross_entropy(clipper(x), torch.zeros(0, dtype=torch.long),
                                                     reduction="none"), 1.0)
    assert norms.shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_a_layer_that_mixes_rows_of_different_images_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):  # 3 rows per 2 images: rows cannot be assigned to images
            return self.lin(x.reshape(-1, 4)[: 3 * len(x) // 2]).sum() * torch.ones(len(x), 2)

    model = Mixer()
    clipper = PerSampleClipper(model)
    with pytest.raises(ModelError, match="mixes samples"):
        clipper.clipped_backward(clipper(torch.randn(2, 2, 4)).sum(1), 1.0)
