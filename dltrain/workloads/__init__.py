"""The built-in workloads: one module per workload, each ending in `WORKLOAD = Workload(...)`.

The interface they implement, and the registry that also takes workloads from other packages
(`dltrain.register_workload`, the entry-point group `dltrain.workloads`), live in dltrain.workload.
Nothing is imported here: a workload module (and its libraries: torchvision, transformers) is
imported when a recipe names it.
"""

# A plain dict: the name a recipe's `workload:` key takes -> "module:attribute" of its Workload.
BUILTIN = {
    "cnn": "dltrain.workloads.cnn:WORKLOAD",
    "rnn": "dltrain.workloads.rnn:WORKLOAD",
    "bert": "dltrain.workloads.bert:WORKLOAD",
}
