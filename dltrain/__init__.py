"""dltrain: train and benchmark reference deep-learning workloads on any hardware."""

__version__ = "0.1.0"
