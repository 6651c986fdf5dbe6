"""Optional dependencies: which pip extra provides which module, and one line when one is missing.

The core install (`pip install dltrain`) trains with Accelerate; each reference workload and each
optional feature needs an extra (pyproject.toml). A workload module names the modules it needs in
`Workload(requires={"torchvision": "vision"})`; features are checked here. What is missing fails before
any process or data is started, with the install line:

    dltrain: error: the cnn workload needs torchvision, which is not installed: pip install 'dltrain[vision]'
"""

from __future__ import annotations

import importlib.util

from dltrain.recipe import RecipeError

# Module -> the extra that installs it, for features outside the workloads and as the fallback
# when a lazy import deep inside fails anyway (cli.main turns that into the same one line).
EXTRA_OF = {
    "torchvision": "vision",
    "transformers": "nlp",
    "datasets": "nlp",
    "wandb": "wandb",
    "deepspeed": "deepspeed",
    "matplotlib": "plots",
    "torchviz": "viz",
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a None entry in sys.modules, as a
    test uses to hide a package, counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str, extra: str | None = None) -> str:
    extra = extra or EXTRA_OF.get(module)
    return f"pip install 'dltrain[{extra}]'" if extra else f"pip install {module}"


def require(modules: dict[str, str], what: str, alternative: str = "") -> None:
    """RecipeError naming the first missing module of `modules` (module -> extra) and its extra."""
    for module, extra in modules.items():
        if not installed(module):
            other = f", or {alternative}" if alternative else ""
            raise RecipeError(f"{what} needs {module}, which is not installed: {install_hint(module, extra)}{other}")


def check_recipe(recipe, workload) -> None:
    """What this recipe needs installed: its workload's modules (Workload.requires), W&B when
    tracking.wandb is on, DeepSpeed when a ZeRO stage is asked for."""
    require(workload.requires, f"the {recipe.workload} workload")
    if getattr(recipe.tracking, "wandb", False):
        require({"wandb": "wandb"}, "tracking.wandb: true", "--set tracking.wandb=false")
    if recipe.deepspeed is not None and recipe.deepspeed.zero_stage > 0:
        require(
            {"deepspeed": "deepspeed"},
            f"deepspeed.zero_stage={recipe.deepspeed.zero_stage}",
            "--set deepspeed.zero_stage=0",
        )


def missing_module_error(exc: ModuleNotFoundError) -> str | None:
    """One line for an optional module that a lazy import did not find, None for any other."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    return f"{top} is not installed (the '{EXTRA_OF[top]}' extra): {install_hint(top)}"
