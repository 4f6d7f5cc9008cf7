"""fedfleet: cross-device federated learning at scale, embedded or on Kubernetes."""

__all__ = ["__version__"]

__version__ = "0.1.0"
