"""Model factory: every supported family trains under Opacus with correct, clipped per-sample gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedvision.errors import ConfigError, ModelError
from fedvision.models import create_model, load_model, save_model
from fedvision.train import TrainConfig, evaluate, train_private

# (name, slow): slow families take > 10 s for per-sample gradients on 2 CPU cores.
FAMILIES = [
    ("fedvision_cnn", False),
    ("fedvision_swin", False),
    ("fedvision_scatternet", False),
    ("resnet18", False),
    ("resnet10t", False),
    ("efficientnet_b0", True),
    ("mobilenetv3_small_100", False),
    ("convnext_atto", False),
    ("mobilevit_xxs", False),
    ("vit_tiny_patch16_224", False),
    ("deit_tiny_patch16_224", False),
]


def _no_dropout(model: nn.Module) -> nn.Module:
    """Make the forward deterministic so per-example gradients can be compared exactly."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
        if hasattr(m, "drop_rate") and isinstance(m.drop_rate, float):
            m.drop_rate = 0.0
    return model


@pytest.fixture
def float64():
    """Float64 so per-example gradients of deep, randomly initialised nets compare exactly (in float32 their
    chaotic forward pass differs by ~1 % between a batch of 4 and a batch of 1 for MobileNetV3)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if slow else n for n, slow in FAMILIES])
def test_dp_sgd_clips_true_per_sample_gradients_and_learns(name, float64):
    torch.manual_seed(0)
    model = _no_dropout(create_model(name, 3, img_size=32))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0])

    # Reference: each example's gradient computed on its own with plain autograd.
    model.train()
    per_example = []
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_example.append(_flat_grad(model))
    model.zero_grad()
    norms = torch.stack([g.norm() for g in per_example])
    clip = float(norms.median())  # some examples get clipped, some do not
    clipped = [g * min(1.0, clip / float(g.norm())) for g in per_example]
    expected_update = -torch.stack(clipped).mean(0)  # lr 1, σ 0, sample rate 1: one step, all 4 examples

    before = _flat_params(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1.0, noise_multiplier=0.0, max_grad_norm=clip, seed=0, device="cpu")
    result = train_private(model, torch.utils.data.TensorDataset(x, y), cfg)
    update = _flat_params(model) - before
    assert result.steps == 1 and result.sample_rate == 1.0
    rel_err = float((update - expected_update).norm() / expected_update.norm())
    assert rel_err < 1e-6, "DP update is not the mean of the clipped per-example gradients"
    assert max(float(g.norm()) for g in clipped) <= clip * (1 + 1e-9)
    assert float(update.norm()) <= clip * (1 + 1e-9)

    # A few DP-SGD steps on a learnable task lower the loss (float32, from the initial weights). σ is small
    # because the noise norm grows with √(parameters): at σ = 0.3 on a 16-sample batch the noise on an
    # 11M-parameter ResNet is 100× the clipped signal, so no learning is visible in a few steps.
    torch.set_default_dtype(torch.float32)
    model.load_state_dict(initial)
    model.float()
    torch.manual_seed(1)
    ys = torch.arange(16) % 2
    xs = 0.5 * torch.rand(16, 3, 32, 32) + 0.5 * ys[:, None, None, None]  # class = brightness
    ds = torch.utils.data.TensorDataset(xs, ys)
    start = evaluate(model, ds, device="cpu").loss
    # This checks learning, not privacy: the test-only seeded randomness keeps the few Poisson batches the same.
    train_private(model, ds, TrainConfig(epochs=4, batch_size=8, lr=0.05, noise_multiplier=1e-3,
                                         max_grad_norm=1.0, seed=0, insecure_dp_seed=0, device="cpu"))
    assert evaluate(model, ds, device="cpu").loss < start


def test_own_models_are_built_without_importing_timm():
    """Every ClientApp process of a deployed site builds the model: fedvision's own ones must not pay timm's
    (and torchvision's) import. timm's registry still sees them once timm is loaded."""
    import subprocess
    import sys

    code = ("import sys; from fedvision.models import create_model; create_model('fedvision_cnn', 2, img_size=8); "
            "assert 'timm' not in sys.modules, 'timm imported'; create_model('resnet10t', 2, img_size=32); "
            "import timm; assert timm.is_model('fedvision_scatternet')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_scatternet_keeps_its_fixed_filters_out_of_the_weights():
    model = create_model("fedvision_scatternet", 10, in_chans=1, img_size=8)
    assert sorted(model.state_dict()) == ["head.bias", "head.weight"]  # the only trainable (and sent) weights
    assert all(not p.requires_grad for p in model.scattering.buffers())
    # Certification feeds broadcast (non-contiguous) batches of noisy copies; kymatio alone would refuse them.
    assert model(torch.rand(1, 1, 8, 8).expand(3, -1, -1, -1)).shape == (3, 10)


def test_scatternet_features_carry_little_that_every_image_shares():
    """DP noise is isotropic: along a feature direction every image shares, it moves all logits together and
    swings the decision threshold (the demo's plateau with groups of 9 channels: 96 % of the features' energy
    in their mean). Per-channel normalisation keeps that share small on the demo's images."""
    from fedvision.data import load_dataset

    data = load_dataset("synthetic-derm:0", image_size=32, channels=3, split="train").dataset
    x = torch.stack([data[i][0] for i in range(0, len(data), 15)])  # 120 images across the three sites
    model = create_model("fedvision_scatternet", 2, in_chans=3, img_size=32)
    with torch.no_grad():
        features = model.features(x)
    shared = features.mean(0).square().sum() / features.square().sum(1).mean()
    assert shared < 0.5, f"{shared:.2f} of the features' energy is shared by every image"


def test_swin_from_timm_is_refused_with_a_reason():
    with pytest.raises(ModelError, match="fedvision_swin"):
        create_model("swin_tiny_patch4_window7_224", 2, img_size=32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="no_such_model", num_classes=2), "unknown model 'no_such_model'"),
    (dict(name="fedvision_cnn", num_classes=1), "num_classes"),
    (dict(name="fedvision_cnn", num_classes=2, in_chans=0), "in_chans"),
    (dict(name="fedvision_swin", num_classes=2, img_size=30), "multiple"),
    (dict(name="fedvision_scatternet", num_classes=2, img_size=31), "multiple"),
])
def test_bad_model_arguments_give_one_line_errors(kwargs, match):
    with pytest.raises(ModelError, match=match) as e:
        create_model(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [("epsilon_budget", 0.0), ("epsilon_budget", -1.0), ("delta", 0.0),
                                          ("delta", 1.0), ("lr", 0.0), ("epochs", 0), ("max_grad_norm", -1.0)])
def test_bad_training_arguments_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        TrainConfig(**{field: value})


def test_save_and_load_keep_architecture_and_classes(tmp_path):
    model = create_model("vit_tiny_patch16_224", 2, in_chans=3, img_size=32).eval()
    path = save_model(model, tmp_path / "m.pt", {"class_names": ["benign", "malignant"], "noise_std": 0.25})
    loaded = load_model(path).eval()
    meta = loaded.fedvision_meta
    assert (meta["architecture"], meta["num_classes"], meta["in_chans"], meta["img_size"]) == \
        ("vit_tiny_patch16_224", 2, 3, 32)
    assert meta["class_names"] == ["benign", "malignant"] and meta["noise_std"] == 0.25
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


def test_load_model_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
