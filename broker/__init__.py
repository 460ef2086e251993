"""model-broker: a gRPC daemon that brokers chat completions across model providers."""

__version__ = "0.1.0"
