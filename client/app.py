"""ClientApp: a site. Thin Flower glue around ``fedvision.site.Site``; replies follow ``fedvision.messages``."""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedvision.config import NodeConfig, RunConfig
from fedvision.errors import FedVisionError
from fedvision.logs import setup_logging
from fedvision.messages import EvaluateReply, Refusal, TrainReply
from fedvision.site import Site, public_reason

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


def _refuse(msg: Message, context: Context, error: FedVisionError, what: str, site: Site | None = None) -> Message:
    """A refusal (policy, spent budget, unusable local data) is an answer, not a crash. Its reason leaves the
    site, so the site's own paths in it are made relative first."""
    log.warning("%s %s: %s", _name(context), what, error)
    try:
        reason = public_reason(str(error), NodeConfig.from_mapping(context.node_config))
    except FedVisionError:
        reason = public_reason(str(error), NodeConfig())
    return Message(Refusal(_name(context), reason, _spent(site)).to_record(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = None
    try:
        site = _site(context)
        config = msg.content["config"]
        state, metrics = site.train(msg.content["arrays"].to_torch_state_dict(), int(config["server-round"]),
                                    float(config.get("proximal-mu", 0.0)))
    except FedVisionError as e:
        return _refuse(msg, context, e, "refuses round", site)
    return Message(TrainReply(site.name, state, metrics).to_record(), reply_to=msg)


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
        release = site.evaluate(msg.content["arrays"].to_torch_state_dict(), int(config.get("server-round", 0)),
                                groups=bool(config.get("groups", 1)))
    except FedVisionError as e:
        return _refuse(msg, context, e, "cannot evaluate")
    return Message(EvaluateReply.from_release(site.name, release).to_record(), reply_to=msg)
