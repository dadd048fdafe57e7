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

from fedvision.dp import epsilon_of, epsilon_rdp, noise_for_budget
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
    # The ledger's RDP cross-check is exactly that accountant; its enforced (PLD) ε is tighter.
    assert epsilon_rdp(ledger.history, DELTA) == pytest.approx(expected, rel=1e-6)
    assert ledger.epsilon(DELTA) == epsilon_of(ledger.history, DELTA) < expected
    assert result.epsilon == pytest.approx(ledger.epsilon(DELTA), rel=1e-12), "train_private reports the cumulative ε"
    # Cumulative, never per round: strictly more than the last training alone, under either accountant.
    last = RDPAccountant()
    last.history = [(result.noise_multiplier, result.sample_rate, result.steps)]
    assert epsilon_rdp(ledger.history, DELTA) > last.get_epsilon(delta=DELTA) * 1.2
    assert ledger.epsilon(DELTA) > epsilon_of(last.history, DELTA) * 1.2
    # A new ledger object on the same file reloads the whole history.
    reloaded = PrivacyLedger(tmp_path / "ledger.json")
    assert reloaded.epsilon(DELTA) == ledger.epsilon(DELTA)
    assert epsilon_rdp(reloaded.history, DELTA) == pytest.approx(expected, rel=1e-12)


def test_budget_refusal_happens_before_any_step(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
    cfg = TrainConfig(epochs=1, batch_size=10, noise_multiplier=1.0, epsilon_budget=5.0, lr=0.05, device="cpu")
    train_private(model, _tiny_dataset(), cfg, ledger)  # 4 steps at q = 0.25: ε ≈ 4.2 (PLD) of the 5.0 budget
    spent, saved = ledger.epsilon(DELTA), path.read_bytes()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceededError, match="budget 5 ") as e:  # 8 steps: ε ≈ 5.5
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
        "    ledger.charge(noise_multiplier=1.0 + i % 7 / 10, sample_rate=0.01, steps=100, delta=1e-5, round=i)\n"
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


def test_a_run_spends_its_allotment_and_the_lifetime_budget_stops_the_fifth(tmp_path):
    """Lifetime budget 8, run-epsilon 2: four runs each add ≈ 2 to the site's cumulative ε; the fifth is refused
    before any step, with the ledger file and the weights untouched."""
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    model = create_model("fedvision_cnn", 2, in_chans=1, img_size=8)
    data = _tiny_dataset()
    cfg = TrainConfig(epochs=1, batch_size=10, epsilon_budget=8.0, run_epsilon=2.0, delta=DELTA, planned_steps=8,
                      lr=0.05, device="cpu")
    spent = [0.0]
    for run in range(4):
        sigmas = [train_private(model, data, cfg, ledger, charge={"run": f"run-{run}", "round": r}).noise_multiplier
                  for r in (1, 2)]  # two rounds of 4 steps: the planned 8
        assert sigmas[0] == sigmas[1], "every round of a run uses the run's σ"
        spent.append(ledger.epsilon(DELTA))
        assert spent[-1] - spent[-2] == pytest.approx(2.0, abs=0.05), spent
    saved, weights = path.read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceededError, match="before any step"):
        train_private(model, data, cfg, ledger, charge={"run": "run-4", "round": 1})
    assert path.read_bytes() == saved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_racing_processes_cannot_pass_the_budget_together(tmp_path):
    """Two real processes, each holding a ledger object loaded before the other charged, charge at the same
    moment a release that fits the budget once but not twice: exactly one is recorded, in every trial."""
    charger = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedvision.errors import BudgetExceededError\n"
        "from fedvision.privacy import PrivacyLedger\n"
        "ledger, go = PrivacyLedger(sys.argv[1]), Path(sys.argv[2])\n"
        "Path(sys.argv[3]).touch()\n"  # loaded: ready
        "while not go.exists():\n"
        "    time.sleep(0.001)\n"
        "try:\n"
        "    ledger.charge(noise_multiplier=1.0, sample_rate=0.1, steps=50, delta=1e-5, budget=float(sys.argv[4]),\n"
        "                  run=sys.argv[3])\n"
        "    print('charged')\n"
        "except BudgetExceededError:\n"
        "    print('refused')\n"
    )
    one = epsilon_of([(1.0, 0.1, 50)], DELTA)
    two = epsilon_of([(1.0, 0.1, 50)] * 2, DELTA)
    budget = (one + two) / 2
    for trial in range(2):
        path, go = tmp_path / f"ledger-{trial}.json", tmp_path / f"go-{trial}"
        ready = [tmp_path / f"ready-{trial}-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", charger, str(path), str(go), str(r), str(budget)],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                 for r in ready]
        deadline = time.time() + 120
        while not all(r.exists() for r in ready) and time.time() < deadline:
            time.sleep(0.01)
        go.touch()  # both hold a ledger loaded empty; both now check and charge
        outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
        assert outcomes == ["charged", "refused"], outcomes
        ledger = PrivacyLedger(path)
        assert len(ledger.entries) == 1 and ledger.epsilon(DELTA) <= budget


def test_site_policy_refuses_runs_asking_for_less_privacy():
    from fedvision.config import RunConfig
    from fedvision.privacy import SitePolicy

    policy = SitePolicy(dp=True, epsilon_budget=8.0, delta=1e-5, run_epsilon=2.0, min_noise_multiplier=1.0,
                        max_grad_norm=1.0)
    assert policy.refusal(RunConfig()) is None
    cases = {"dp=false": RunConfig(dp=False), "delta=0.001": RunConfig(delta=1e-3),
             "noise-multiplier=0.5": RunConfig(noise_multiplier=0.5), "max-grad-norm=2": RunConfig(max_grad_norm=2.0)}
    for asked, run in cases.items():
        assert f"the run asks {asked}" in policy.refusal(run)
    assert policy.refusal(RunConfig(delta=1e-6, noise_multiplier=3.0, max_grad_norm=0.5)) is None, "stricter is fine"
    assert policy.run_allotment(RunConfig(epsilon_budget=8.0)) == 2.0
    assert policy.run_allotment(RunConfig(epsilon_budget=0.5)) == 0.5, "a stricter run request is honoured"
    with pytest.raises(ConfigError, match="1/N"):
        policy.check_records(200_000, "node config")
    simulated = SitePolicy(dp=False, epsilon_budget=8.0, delta=1e-5, simulated=True)
    assert simulated.refusal(RunConfig(dp=False)) is None, "in simulation the run config is the policy"


def test_a_deployed_site_refuses_before_reading_data_and_requires_its_own_policy(tmp_path):
    from fedvision.config import NodeConfig, RunConfig
    from fedvision.errors import PolicyRefusal
    from fedvision.site import Site

    node = {"data": f"manifest:{tmp_path / 'missing.csv'}", "state-dir": str(tmp_path / "state"),
            "epsilon-budget": 8.0, "delta": 1e-5}
    for asked in ({"dp": False}, {"delta": 1e-3}, {"insecure-shared-dp-seed": 0}):
        with pytest.raises(PolicyRefusal, match="the run asks"):  # not the missing manifest: no data was read
            Site.from_configs(RunConfig.from_mapping(asked), NodeConfig.from_mapping(node))
    assert not (tmp_path / "state").exists(), "a refused run touches nothing at the site"
    with pytest.raises(DataError, match="missing.csv"):  # an acceptable run goes on to read the data
        Site.from_configs(RunConfig(), NodeConfig.from_mapping(node))
    for key in ("epsilon-budget", "delta"):
        with pytest.raises(ConfigError, match=f"'{key}' is required"):
            Site.from_configs(RunConfig(), NodeConfig.from_mapping({k: v for k, v in node.items() if k != key}))


def test_site_status_reports_each_record_set_and_run(tmp_path, capsys):
    from fedvision.cli import main
    from fedvision.privacy import EVALUATION

    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for run in ("run-a", "run-b"):
        for r in (1, 2):
            ledger.charge(noise_multiplier=1.5, sample_rate=0.2, steps=20, delta=DELTA, budget=8.0, run=run, round=r,
                          randomness="os-entropy")
    ledger.charge(noise_multiplier=8.0, sample_rate=1.0, steps=1, delta=DELTA, budget=8.0, records=EVALUATION,
                  run="run-a", round=1, randomness="os-entropy")
    assert main(["site", "status", "--state-dir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    training = status["record_sets"]["training"]
    assert training["epsilon"] == pytest.approx(ledger.epsilon(DELTA))
    assert training["remaining"] == pytest.approx(8.0 - training["epsilon"])
    assert [(r["run"], r["rounds"]) for r in training["runs"]] == [("run-a", [1, 2]), ("run-b", [1, 2])]
    assert training["runs"][1]["epsilon_after"] == pytest.approx(training["epsilon"])
    assert status["record_sets"]["evaluation"]["epsilon"] == pytest.approx(ledger.epsilon(DELTA, EVALUATION))
    assert main(["site", "status", "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "training records: ε = " in text and "evaluation records" in text and "run run-b: rounds 1–2" in text
    assert main(["site", "status", "--state-dir", str(tmp_path / "nowhere")]) == 2
