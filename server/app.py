"""ServerApp: the coordinator. Thin Flower glue: rounds on Flower's Grid with Flower's strategies; every
decision (validation, records, checkpoints, resume) is made by ``fedvision.federation.Coordinator``."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedvision.logs import setup_logging
from fedvision.config import RunConfig
from fedvision.errors import MalformedReply
from fedvision.federation import Coordinator
from fedvision.messages import EvaluateReply, TrainReply
from fedvision.models import state_digest
from server.strategy import build_strategy, restore_strategy_state, strategy_state

log = logging.getLogger("fedvision.coordinator")
setup_logging()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_mapping(context.run_config)
    coordinator = Coordinator(run)
    state, saved_strategy = coordinator.start()
    strategy = build_strategy(run)
    restore_strategy_state(strategy, saved_strategy)
    silence = f"no reply within round-timeout {run.round_timeout:g}s"

    if coordinator.round == 0 and (central := coordinator.central_evaluate(state)) is not None:
        coordinator.record["initial_central"] = central
        log.info("round 0: central accuracy %.3f", central["accuracy"])

    for server_round in range(coordinator.round + 1, run.num_server_rounds + 1):
        started = time.perf_counter()
        log.info("round %d/%d", server_round, run.num_server_rounds)
        parent, parent_sha256 = state, state_digest(state)
        coordinator.know_nodes({n.node_id: n.name for n in grid.get_nodes()})
        messages = list(strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=run.round_timeout))
        # Sites that did not answer (killed, cut off, too slow) are named as failed, not silently dropped.
        answered = {m.metadata.src_node_id for m in replies}
        train_replies = [_train_reply(m, coordinator, answered) for m in replies] + [
            TrainReply(site=coordinator.site_of(node), error=silence) for node in _silent(messages, replies)]
        accepted = coordinator.screen(server_round, train_replies, state)
        aggregated = False
        if len(accepted) >= run.min_train_nodes:
            # The strategy sees the checked weights and the capped weight only, never what else a site sent.
            weights = coordinator.aggregation_weights(server_round, train_replies, accepted)
            for i in accepted:
                replies[i].content = RecordDict({"arrays": replies[i].content["arrays"],
                                                 "metrics": MetricRecord({"num-examples": weights[i]})})
            new_arrays, _ = strategy.aggregate_train(server_round, [replies[i] for i in accepted])
            if new_arrays is not None:
                state, aggregated = new_arrays.to_torch_state_dict(), True
                coordinator.name_opposing(server_round, train_replies, accepted, parent, state)
        else:
            log.warning("round %d: %d valid updates < min-train-nodes %d; global model unchanged",
                        server_round, len(accepted), run.min_train_nodes)

        # Sites release per-group counts (each a charge to their evaluation records' budget) for the last round
        # only, which the audit's fairness tables use; other rounds get each site's whole confusion matrix.
        last_round = ConfigRecord({"groups": int(server_round == run.num_server_rounds)})
        eval_messages = list(strategy.configure_evaluate(server_round, ArrayRecord(state), last_round, grid))
        eval_replies = list(grid.send_and_receive(eval_messages, timeout=run.round_timeout))
        answered = {m.metadata.src_node_id for m in eval_replies}
        evaluations = [_evaluate_reply(m, coordinator, answered) for m in eval_replies] + [
            EvaluateReply(site=coordinator.site_of(node), error=silence) for node in _silent(eval_messages, eval_replies)]
        central = coordinator.central_evaluate(state)
        coordinator.finish_round(server_round, train_replies, accepted, aggregated, evaluations, central,
                                 time.perf_counter() - started, parent_sha256=parent_sha256)
        coordinator.checkpoint(state, strategy_state(strategy))
        last = coordinator.record["rounds"][-1]
        log.info("round %d done in %.1fs: %d/%d updates aggregated, federated accuracy %s%s", server_round,
                 last["timing"]["round_seconds"], len(accepted), len(train_replies),
                 _fmt(last["evaluate"]["accuracy"]), f", central accuracy {_fmt(central['accuracy'])}" if central else "")
    coordinator.finish()
    log.info("run %s: %s", coordinator.record["status"], coordinator.dir)


def _silent(sent: list[Message], replies: list[Message]) -> list[int]:
    """Nodes that were sent a message and did not reply."""
    answered = {m.metadata.src_node_id for m in replies}
    return [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]


def _train_reply(msg: Message, coordinator: Coordinator, answered: set[int]) -> TrainReply:
    node = msg.metadata.src_node_id
    if msg.has_error():
        return TrainReply(site=coordinator.site_of(node), error=msg.error.reason)
    try:
        reply = TrainReply.from_record(msg.content)
        reply.site = coordinator.site_of(node, reply.site, answered)
    except MalformedReply as e:
        return TrainReply(site=coordinator.site_of(node), rejected=f"malformed reply: {e}")
    return reply


def _evaluate_reply(msg: Message, coordinator: Coordinator, answered: set[int]) -> EvaluateReply:
    node = msg.metadata.src_node_id
    if msg.has_error():
        return EvaluateReply(site=coordinator.site_of(node), error=msg.error.reason)
    try:
        reply = EvaluateReply.from_record(msg.content, coordinator.classes)
        reply.site = coordinator.site_of(node, reply.site, answered)
    except MalformedReply as e:
        return EvaluateReply(site=coordinator.site_of(node), rejected=f"malformed reply: {e}")
    return reply


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
