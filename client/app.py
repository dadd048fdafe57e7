"""ClientApp: a site. Thin Flower glue around ``fedvision.site.Site``."""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvision.logs import setup_logging
from fedvision.config import NodeConfig, RunConfig
from fedvision.errors import FedVisionError
from fedvision.site import Site

log = logging.getLogger("fedvision.site")
setup_logging()
app = ClientApp()


def _site(context: Context) -> Site:
    return Site.from_configs(RunConfig.from_mapping(context.run_config), NodeConfig.from_mapping(context.node_config))


def _name(context: Context) -> str:
    node = context.node_config
    if "partition-id" in node and "data" not in node:
        return f"site-{int(node['partition-id']) + 1}"
    return str(node.get("site-name") or node.get("state-dir") or f"node-{context.node_id}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = None
    try:
        site = _site(context)
        config = msg.content["config"]
        state, metrics = site.train(msg.content["arrays"].to_torch_state_dict(), int(config["server-round"]),
                                    float(config.get("proximal-mu", 0.0)))
    except FedVisionError as e:
        # A refusal (budget spent, unusable local data) is an answer, not a crash: the server logs the reason.
        log.warning("%s refuses round: %s", _name(context), e)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, **_spent(site)}),
                                   "refusal": ConfigRecord({"reason": str(e), "site": _name(context)})}),
                       reply_to=msg)
    return Message(RecordDict({"arrays": ArrayRecord(state),
                               "metrics": MetricRecord({k: v for k, v in metrics.items() if v is not None}),
                               "site": ConfigRecord({"name": site.name})}), reply_to=msg)


def _spent(site: Site | None) -> dict:
    """The privacy a refusing site has spent so far, so the run record stays current even when it trains no more."""
    if site is None or not site.run.dp:
        return {}
    try:
        return site.privacy_metrics()
    except FedVisionError:  # an unreadable ledger is the refusal's own reason
        return {}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        site = _site(context)
        config = msg.content["config"] if "config" in msg.content else {}
        result = site.evaluate(msg.content["arrays"].to_torch_state_dict(), int(config.get("server-round", 0)),
                               groups=bool(config.get("groups", 1)))
    except FedVisionError as e:
        log.warning("%s cannot evaluate: %s", _name(context), e)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0}),
                                   "refusal": ConfigRecord({"reason": str(e), "site": _name(context)})}),
                       reply_to=msg)
    groups = result.pop("groups")
    classes = result.pop("classes", [])
    return Message(RecordDict({"metrics": MetricRecord(result),
                               "site": ConfigRecord({"name": site.name, "groups": json.dumps(groups),
                                                     "classes": json.dumps(classes)})}), reply_to=msg)
