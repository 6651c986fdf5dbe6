"""dltrain: train and benchmark reference deep-learning workloads on any hardware.

    import dltrain
    result = dltrain.train("recipes/cnn_mnist.yaml", profile="cpu_test", train={"max_steps": 3})
    dltrain.register_workload("mine", my_workload)   # a dltrain.Workload

Importing this package loads neither torch nor a workload: `train`, `RunResult` come on first use.
"""

from dltrain.workload import Workload, register_workload

__version__ = "0.1.0"
__all__ = ["RunResult", "Workload", "register_workload", "train"]


def __getattr__(name: str):
    if name in ("train", "RunResult"):
        from dltrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'dltrain' has no attribute {name!r}")
