"""User-facing errors.

Every problem a user can cause (bad config value, bad image, spent budget, ...) is raised as a
``FedVisionError`` subclass whose message is one line naming the file, row or field. The CLI prints
that line and exits with code 2 instead of showing a traceback.
"""


class FedVisionError(Exception):
    """Base class for errors caused by input the user controls."""


class ConfigError(FedVisionError, ValueError):
    """A config key is unknown or a value is out of range."""


class DataError(FedVisionError, ValueError):
    """A dataset, manifest row or image file cannot be used."""


class ModelError(FedVisionError, ValueError):
    """A model cannot be created, made DP-compatible or loaded."""


class BudgetExceededError(FedVisionError, RuntimeError):
    """Training would push a site's cumulative privacy loss past its budget."""


class UpdateRejected(FedVisionError, ValueError):
    """A site's model update failed validation on the server."""


class PolicyRefusal(FedVisionError, RuntimeError):
    """A run asks a site for less privacy than the site's own policy allows."""


class MalformedReply(UpdateRejected):
    """A site's reply does not follow its message schema (``fedvision.messages``)."""
