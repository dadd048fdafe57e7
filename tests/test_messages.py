"""The message schemas (fedvision.messages) and what the coordinator does with what a site claims.

Each check attacks the coordinator the way a faulty or malicious site could: keys outside the schema, values of
the wrong type or range, tables of the wrong shape, a lie about the number of examples, another site's name."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from fedvision.config import NodeConfig, RunConfig
from fedvision.errors import ConfigError, MalformedReply
from fedvision.federation import Coordinator
from fedvision.messages import EvaluateReply, Refusal, TrainReply
from fedvision.site import Site, public_reason

DIGITS = {"dataset": "digits", "partitioning": "iid", "image-size": 8, "channels": 1, "batch-size": 64,
          "num-server-rounds": 1}


@pytest.fixture(scope="module")
def real_replies(tmp_path_factory):
    """A real simulated site's train and evaluate replies, as records (digits, DP on)."""
    run = RunConfig.from_mapping({**DIGITS, "run-dir": str(tmp_path_factory.mktemp("messages"))})
    site = Site.from_configs(run, NodeConfig.from_mapping({"partition-id": 0, "num-partitions": 3}))
    state = site.model().state_dict()
    weights, metrics = site.train(state, 1)
    release = site.evaluate(weights, 1)
    return (TrainReply(site.name, weights, metrics).to_record(),
            EvaluateReply.from_release(site.name, release).to_record(), list(site.train_data.classes))


def test_a_real_sites_replies_follow_the_schema_both_ways(real_replies):
    train, evaluate, classes = real_replies
    reply = TrainReply.from_record(train)
    assert reply.site == "site-1" and reply.metrics["dp"] == 1 and reply.metrics["num-examples"] > 0
    assert 0 < reply.metrics["epsilon"] <= 8 and reply.metrics["secret-randomness"] == 1
    assert all(isinstance(a, np.ndarray) for a in reply.arrays.values())
    evaluation = EvaluateReply.from_record(evaluate, classes)
    k = len(classes)
    assert all(np.asarray(cm).shape == (k, k) for tables in evaluation.groups.values() for cm in tables.values())
    assert evaluation.metrics["count-noise-std"] > 0 and "epsilon-evaluation" in evaluation.metrics


def _copy(record: RecordDict) -> RecordDict:
    out = RecordDict()
    for key, value in record.items():
        out[key] = type(value)(dict(value)) if not isinstance(value, ArrayRecord) else value
    return out


def _set(record: RecordDict, part: str, key: str, value) -> RecordDict:
    out = _copy(record)
    items = dict(out[part])
    if value is None:
        del items[key]
    else:
        items[key] = value
    out[part] = type(record[part])(items)
    return out


@pytest.mark.parametrize("part, key, value, named", [
    ("metrics", "extra-key", 1.0, "unexpected extra-key"),
    ("metrics", "epsilon", None, "missing epsilon"),
    ("metrics", "num-examples", 0, "num-examples"),
    ("metrics", "num-examples", -5, "num-examples"),
    ("metrics", "num-examples", 10.5, "num-examples"),
    ("metrics", "epsilon", math.nan, "epsilon"),
    ("metrics", "delta", 1.5, "delta"),
    ("site", "name", "", "site name"),
])
def test_a_train_reply_outside_its_schema_is_rejected_naming_the_key(real_replies, part, key, value, named):
    with pytest.raises(MalformedReply, match=named):
        TrainReply.from_record(_set(real_replies[0], part, key, value))


def test_a_train_reply_with_a_foreign_record_or_unreadable_arrays_is_rejected(real_replies):
    extra = _copy(real_replies[0])
    extra["more"] = ConfigRecord({"a": 1})
    with pytest.raises(MalformedReply, match="unexpected more"):
        TrainReply.from_record(extra)
    swapped = _copy(real_replies[0])
    swapped["arrays"] = ConfigRecord({"w": 1})
    with pytest.raises(MalformedReply, match="arrays"):
        TrainReply.from_record(swapped)


@pytest.mark.parametrize("change, named", [
    (lambda g, c: {**g, "site": {"site-1": [[1.0]]}}, "2×2|10×10"),
    (lambda g, c: {**g, "sex": {"F": [[math.inf] * len(c)] * len(c)}}, "finite"),
    (lambda g, c: [1, 2], "mapping"),
])
def test_an_evaluate_reply_with_malformed_tables_is_rejected(real_replies, change, named):
    _, evaluate, classes = real_replies
    groups = json.loads(evaluate["site"]["groups"])
    bad = _set(evaluate, "site", "groups", json.dumps(change(groups, classes)))
    with pytest.raises(MalformedReply, match=named):
        EvaluateReply.from_record(bad, classes)


def test_an_evaluate_reply_with_other_classes_or_a_bad_accuracy_is_rejected(real_replies):
    _, evaluate, classes = real_replies
    with pytest.raises(MalformedReply, match="differ from the run"):
        EvaluateReply.from_record(evaluate, list(reversed(classes)))
    with pytest.raises(MalformedReply, match="accuracy"):
        EvaluateReply.from_record(_set(evaluate, "metrics", "accuracy", 3.0), classes)


def test_a_refusal_round_trips_and_its_privacy_keys_are_checked():
    refusal = Refusal("site-2", "privacy budget spent", {"epsilon": 7.9, "delta": 1e-5})
    reply = TrainReply.from_record(refusal.to_record())
    assert (reply.site, reply.refusal, reply.metrics) == ("site-2", "privacy budget spent", refusal.privacy)
    bad = Refusal("site-2", "x", {"epsilon": 7.9, "smuggled": 3.0}).to_record()
    with pytest.raises(MalformedReply, match="unexpected smuggled"):
        TrainReply.from_record(bad)


# -- what the coordinator does with claims ------------------------------------------------------------------
def _coordinator(tmp_path, **config) -> Coordinator:
    return Coordinator(RunConfig.from_mapping({"run-dir": str(tmp_path), "classes": "a,b", "image-size": 8,
                                               "channels": 1, **config}))


def test_a_site_claiming_a_billion_examples_moves_the_aggregate_no_more_than_its_cap(tmp_path):
    """Through Flower's own FedAvg: the liar's update is far from the honest ones; with its claim it would be
    the average, with the cap its share is at most cap / (cap + honest counts)."""
    coordinator = _coordinator(tmp_path)
    honest, liar = np.zeros(4, np.float32), np.full(4, 10.0, np.float32)
    replies = [TrainReply(site=f"site-{i}", arrays={"w": honest.copy()}, metrics={"num-examples": 300})
               for i in (1, 2)] + [TrainReply(site="site-3", arrays={"w": liar}, metrics={"num-examples": 10**9})]
    weights = coordinator.aggregation_weights(1, replies, [0, 1, 2])
    cap = 4 * 300
    assert weights == {0: 300, 1: 300, 2: cap}
    assert coordinator.record["suspects"][0]["site"] == "site-3"
    messages = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.from_numpy(r.arrays["w"])}),
                                    "metrics": MetricRecord({"num-examples": weights[i]})}),
                        metadata=Metadata(run_id=1, message_id=str(i), src_node_id=i + 1, dst_node_id=0,
                                          reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                                          message_type="train"))
                for i, r in enumerate(replies)]
    aggregate, _ = fl.FedAvg().aggregate_train(1, messages)
    moved = float(aggregate["w"].numpy()[0])
    assert moved == pytest.approx(10.0 * cap / (cap + 600), rel=1e-5)  # 6.7, not 10.0 (its claim's share)
    uncapped = _coordinator(tmp_path / "off", **{"max-weight-ratio": 0})
    assert uncapped.aggregation_weights(1, replies, [0, 1, 2])[2] == 10**9


def test_sites_are_known_by_their_node_and_cannot_take_another_sites_name(tmp_path):
    coordinator = _coordinator(tmp_path)
    assert coordinator.site_of(11, "site-1", {11, 12}) == "site-1"
    assert coordinator.site_of(12, "site-2", {11, 12}) == "site-2"
    assert coordinator.site_of(11, "site-2", {11, 12}) == "site-1"  # a node keeps its first name
    with pytest.raises(MalformedReply, match="node 11 holds"):
        coordinator.site_of(13, "site-1", {11, 13})  # node 11 answered this round: 13 impersonates it
    assert coordinator.site_of(14, "site-1", {14}) == "site-1"  # site-1 restarted as a new node: it moves
    assert coordinator.site_of(11) == "node-11" and coordinator.record["nodes"] == {"12": "site-2", "14": "site-1"}
    # A name given at registration (bound to the node's key by Flower) wins over any claim, and never moves.
    coordinator.know_nodes({20: "hospital-a"})
    assert coordinator.site_of(20, "site-9", {20}) == "hospital-a"
    with pytest.raises(MalformedReply, match="node 20 holds"):
        coordinator.site_of(21, "hospital-a", {21})  # even when node 20 is silent
    assert coordinator.site_of(20) == "hospital-a"  # a crashed registered site is named, not node-20


def test_resume_refuses_a_changed_privacy_or_data_config_and_names_the_difference(tmp_path):
    first = _coordinator(tmp_path, **{"num-server-rounds": 2})
    state, _ = first.start()
    first.checkpoint(state, {})
    del first
    with pytest.raises(ConfigError, match=r"dataset: 'synthetic-derm:0' → 'digits'; epsilon-budget: 8\.0 → 20\.0"):
        _coordinator(tmp_path, **{"num-server-rounds": 2, "resume": True, "epsilon-budget": 20.0,
                                  "dataset": "digits"}).start()
    resumed = _coordinator(tmp_path, **{"num-server-rounds": 5, "resume": True, "round-timeout": 30.0})
    resumed.start()
    assert resumed.record["resumes"][-1]["changed"] == {"num-server-rounds": (2, 5), "round-timeout": (600.0, 30.0)}


def test_one_coordinator_per_run_folder(tmp_path):
    holder = _coordinator(tmp_path)
    with pytest.raises(ConfigError, match="in use by another coordinator"):
        _coordinator(tmp_path)
    del holder


def test_a_run_that_aggregated_nothing_is_not_completed(tmp_path):
    coordinator = _coordinator(tmp_path)
    state, _ = coordinator.start()
    coordinator.finish_round(1, [TrainReply(site="site-1", refusal="budget spent")], [], False, [], None, 1.0)
    coordinator.checkpoint(state, {})
    coordinator.finish()
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and "initial weights" in record["reason"]


def test_reasons_that_leave_a_site_carry_no_absolute_paths(tmp_path):
    data = tmp_path / "hospital" / "patient-0042"
    node = NodeConfig.from_mapping({"data": f"manifest:{data}/manifest.csv", "state-dir": str(tmp_path / "state")})
    reason = (f"{data}/manifest.csv row 6: images/00005.png cannot be read; "
              f"ledger {tmp_path}/state/ledger.json; see /etc/secret/dir/file.txt")
    public = public_reason(reason, node)
    assert public == "manifest.csv row 6: images/00005.png cannot be read; ledger ledger.json; see file.txt"
    assert str(tmp_path) not in public and "patient-0042" not in public
