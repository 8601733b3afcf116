"""minimodels: small, readable PyTorch models of the pretraining era sharing one training loop."""

__version__ = "0.1.0"
