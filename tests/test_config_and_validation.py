"""Config schema and update validation: the coordinator's and sites' guards, without Flower."""

import numpy as np
import pytest

from fedvision.config import NodeConfig, RunConfig
from fedvision.errors import ConfigError, UpdateRejected
from fedvision.federation import Coordinator, validate_update
from fedvision.messages import TrainReply
from fedvision.federation_cli import app_defaults


def test_app_defaults_in_pyproject_are_exactly_the_schema():
    run = RunConfig.from_mapping(app_defaults())
    assert run == RunConfig(), "[tool.flwr.app.config] and fedvision.config.RunConfig disagree"


@pytest.mark.parametrize("values, match", [
    ({"num-server-rounds": 0}, "'num-server-rounds' must be ≥ 1"),
    ({"strategy": "fedsgd"}, "'strategy' must be one of"),
    ({"delta": 1.5}, "'delta' must be in \\(0, 1\\)"),
    ({"epsilon-budget": -1}, "'epsilon-budget'"),
    ({"lr": "fast"}, "'lr' must be float"),
    ({"dp": "maybe"}, "'dp' must be bool"),
    ({"local-epoch": 2}, "unknown key 'local-epoch' \\(did you mean local-epochs"),
])
def test_bad_run_config_names_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(values)


def test_node_config_and_simulation_helpers():
    node = NodeConfig.from_mapping({"data": "manifest:/x.csv", "state-dir": "/s", "epsilon-budget": "3.5"})
    assert node.epsilon_budget == 3.5 and not node.simulated
    assert NodeConfig.from_mapping({"partition-id": 1, "num-partitions": 3}).simulated
    with pytest.raises(ConfigError, match="node config: unknown key 'budget'"):
        NodeConfig.from_mapping({"budget": 1})
    run = RunConfig.from_mapping({"site-epsilon-budgets": "0.5, 8", "simulated-attacks": "site-2:nan,site-3:scale=100"})
    assert [run.site_budget(i) for i in range(3)] == [0.5, 8.0, run.epsilon_budget]
    assert run.attacks() == {"site-2": ["nan"], "site-3": ["scale=100"]}
    rotating = RunConfig.from_mapping({"simulated-attacks": "site-4:nan/scale=100/signflip"})
    assert rotating.attacks() == {"site-4": ["nan", "scale=100", "signflip"]}
    for bad in ("site-1:explode", "site-1:nan/scale=big"):
        with pytest.raises(ConfigError, match="unknown attack"):
            RunConfig.from_mapping({"simulated-attacks": bad}).attacks()


def _reference():
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32), "steps": np.zeros((), np.int64)}


@pytest.mark.parametrize("mutate, match", [
    (lambda u: u.pop("b"), "missing b"),
    (lambda u: u.update(extra=np.zeros(1, np.float32)), "unexpected extra"),
    (lambda u: u.update(w=np.zeros((2, 3), np.float32)), "'w' has shape \\(2, 3\\), expected \\(3, 2\\)"),
    (lambda u: u.update(b=np.zeros(2, np.float64)), "'b' has dtype float64"),
    (lambda u: u["w"].__setitem__((0, 0), np.nan), "'w' contains NaN"),
    (lambda u: u["b"].__setitem__(0, np.inf), "'b' contains NaN or infinite"),
    (lambda u: u["w"].__setitem__((0, 0), 1e4), "update norm 1e\\+04 exceeds max-update-norm 100"),
])
def test_invalid_updates_are_rejected_with_the_reason(mutate, match):
    update = {k: v.copy() for k, v in _reference().items()}
    mutate(update)
    with pytest.raises(UpdateRejected, match=match):
        validate_update(_reference(), update, max_norm=100.0)


def test_valid_update_returns_its_norm():
    update = {k: v.copy() for k, v in _reference().items()}
    update["w"][0] = [3.0, 4.0]
    assert validate_update(_reference(), update, max_norm=100.0) == pytest.approx(5.0)


def test_screen_rejects_norm_outliers_and_records_every_exclusion(tmp_path):
    import torch

    coordinator = Coordinator(RunConfig.from_mapping({"run-dir": str(tmp_path), "max-update-norm": 0}))
    global_state = {k: torch.from_numpy(v) for k, v in _reference().items()}

    def reply(site, scale):
        u = {k: v.copy() for k, v in _reference().items()}
        u["w"] += scale
        return TrainReply(site=site, arrays=u, metrics={"num-examples": 10})

    replies = [reply("site-1", 0.1), reply("site-2", 0.12), reply("site-3", 0.09), reply("site-4", 5.0),
               TrainReply(site="site-5", refusal="privacy budget exceeded"), TrainReply(site="site-6", error="timeout")]
    accepted = coordinator.screen(1, replies, global_state)
    assert accepted == [0, 1, 2]
    assert [r["site"] for r in coordinator.record["rejected"]] == ["site-4"]
    assert "median" in coordinator.record["rejected"][0]["reason"]
    assert coordinator.record["refused"][0]["site"] == "site-5"
    assert coordinator.record["failed"][0]["site"] == "site-6"


def test_configuration_reference_is_current():
    from pathlib import Path

    from fedvision.config import config_reference

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert config_reference() in doc, "docs/configuration.md is stale: regenerate it from fedvision.config"


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_every_strategy_builds_and_adaptive_state_survives_a_checkpoint(name):
    import torch

    from server.strategy import build_strategy, restore_strategy_state, strategy_state

    strategy = build_strategy(RunConfig.from_mapping({"strategy": name}))
    if name == "fedadam":
        strategy.m_t = {"w": np.full((2, 2), 0.5, np.float32)}
        strategy.v_t = {"w": np.full((2, 2), 0.25, np.float32)}
    saved = strategy_state(strategy)
    assert bool(saved) == (name == "fedadam")
    reloaded = torch.load(__import__("io").BytesIO(_roundtrip(saved)), weights_only=True)
    fresh = build_strategy(RunConfig.from_mapping({"strategy": name}))
    restore_strategy_state(fresh, reloaded)
    if name == "fedadam":
        assert np.array_equal(fresh.m_t["w"], strategy.m_t["w"]) and np.array_equal(fresh.v_t["w"], strategy.v_t["w"])


def _roundtrip(obj) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
