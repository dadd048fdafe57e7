"""fedvision: federated, differentially private training of vision models, and its audit."""

__version__ = "0.1.0"

from fedvision.errors import FedVisionError  # noqa: F401  (the one exception type users catch)
