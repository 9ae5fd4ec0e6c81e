"""Tideserve: a Kubernetes-native LLM serving operator and SLO- and season-aware autoscaler."""

__version__ = "0.1.0"
