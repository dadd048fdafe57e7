"""Privacy ledger: exact cumulative RDP accounting, crash safety, budget refusal before any step."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedvision.dp import epsilon_of, noise_for_budget
from fedvision.errors import BudgetExceededError, ConfigError, DataError
from fedvision.models import create_model
from fedvision.privacy import PrivacyLedger
from fedvision.train import TrainConfig, train_private

DELTA = 1e-5


def _tiny_dataset(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g))


def test_three_trainings_compose_exactly_like_one_accountant_fed_every_step(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
    reference = RDPAccountant()
    trainings = [dict(noise_multiplier=1.1, batch_size=10, epochs=2), dict(noise_multiplier=0.8, batch_size=8, epochs=1),
                 dict(noise_multiplier=1.5, batch_size=20, epochs=3)]
    for i, kw in enumerate(trainings):
        result = train_private(model, _tiny_dataset(seed=i), TrainConfig(lr=0.05, seed=i, device="cpu", **kw), ledger)
        for _ in range(result.steps):
            reference.step(noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate)
    expected = reference.get_epsilon(delta=DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(expected, rel=1e-6)
    assert result.epsilon == pytest.approx(expected, rel=1e-6), "train_private reports the cumulative ε"
    # Cumulative, never per round: strictly more than the last training alone.
    last = RDPAccountant()
    last.history = [(result.noise_multiplier, result.sample_rate, result.steps)]
    assert ledger.epsilon(DELTA) > last.get_epsilon(delta=DELTA) * 1.2
    # A new ledger object on the same file reloads the whole history.
    assert PrivacyLedger(tmp_path / "ledger.json").epsilon(DELTA) == pytest.approx(expected, rel=1e-12)


def test_budget_refusal_happens_before_any_step(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
    cfg = TrainConfig(epochs=1, batch_size=10, noise_multiplier=1.0, epsilon_budget=6.0, lr=0.05, device="cpu")
    train_private(model, _tiny_dataset(), cfg, ledger)  # 4 steps at q = 0.25: ε ≈ 4.9 of the 6.0 budget
    spent, saved = ledger.epsilon(DELTA), path.read_bytes()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceededError, match="budget 6 ") as e:
        train_private(model, _tiny_dataset(), cfg, ledger)
    assert "\n" not in str(e.value) and "before any step" in str(e.value)
    assert path.read_bytes() == saved, "a refused training must not be recorded"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), "no step may be taken"
    assert PrivacyLedger(path).epsilon(DELTA) == spent


def test_noise_derived_from_budget_spends_it_over_the_planned_rounds(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
    data = _tiny_dataset()
    # 3 rounds of 1 epoch with 4 steps each: σ calibrated once for 12 steps, reaching (just under) ε = 3.
    cfg = TrainConfig(epochs=1, batch_size=10, epsilon_budget=3.0, delta=DELTA, planned_steps=12, lr=0.05,
                      device="cpu")
    sigmas = [train_private(model, data, cfg, ledger).noise_multiplier for _ in range(3)]
    assert sigmas[0] == pytest.approx(sigmas[2], rel=0.01)
    assert 2.9 <= ledger.epsilon(DELTA) <= 3.0
    with pytest.raises(BudgetExceededError):
        train_private(model, data, cfg, ledger)  # a 4th round was not planned and cannot fit


def test_ledger_survives_sigkill_at_any_moment(tmp_path):
    path = tmp_path / "ledger.json"
    writer = (
        "import sys\n"
        "from fedvision.privacy import PrivacyLedger\n"
        "ledger = PrivacyLedger(sys.argv[1])\n"
        "i = len(ledger.entries)\n"
        "while True:\n"
        "    ledger.record(noise_multiplier=1.0 + i % 7 / 10, sample_rate=0.01, steps=100, round=i)\n"
        "    print(i, flush=True)\n"
        "    i += 1\n"
    )
    confirmed = 0
    for kill_after in (0.0, 0.05, 0.2, 0.011, 0.37, 0.003, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        first = proc.stdout.readline()  # start-up done, writing in a loop
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acknowledged = [int(x) for x in (first + out).split()]
        ledger = PrivacyLedger(path)  # loads: never half-written
        n = len(ledger.entries)
        if acknowledged:
            confirmed = acknowledged[-1] + 1
        # Every acknowledged record is there; at most the one in flight beyond it.
        assert confirmed <= n <= confirmed + 1
        assert [e["round"] for e in ledger.entries] == list(range(n)), "entries lost or duplicated"
        confirmed = n
    assert confirmed > 10, "the writer should have recorded something"
    json.loads(path.read_text())


def test_corrupt_ledger_refuses_instead_of_forgetting(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"format": "fedvision-privacy-ledger/1", "entries": [{"noise_multiplier": 1.0')
    with pytest.raises(DataError, match="ledger.json.*refusing"):
        PrivacyLedger(path)


def test_budget_too_small_for_one_round_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
    cfg = TrainConfig(epochs=1, batch_size=10, epsilon_budget=0.05, delta=DELTA, lr=0.05, device="cpu")
    with pytest.raises(BudgetExceededError, match="too small"):
        train_private(model, _tiny_dataset(), cfg, ledger)
    assert ledger.entries == [] and not (tmp_path / "ledger.json").exists()


def test_calibration_and_bad_privacy_arguments():
    sigma = noise_for_budget(8.0, DELTA, 0.01, 1000)
    assert epsilon_of([(sigma, 0.01, 1000)], DELTA) <= 8.0
    assert epsilon_of([(sigma * 0.98, 0.01, 1000)], DELTA) > 8.0 * 0.99
    with pytest.raises(BudgetExceededError, match="too small"):
        noise_for_budget(0.01, DELTA, 0.5, 1000, max_noise_multiplier=20)
    for bad in (0.0, -2.0, float("inf")):
        with pytest.raises(ConfigError, match="budget"):
            noise_for_budget(bad, DELTA, 0.01, 100)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="delta"):
            epsilon_of([(1.0, 0.01, 10)], bad)
