"""Stateless advantage and return estimators over ``[*batch, time]`` tensors.

See ``docs/returns.md`` for the formulas, references and the mask / terminated /
done conventions.
"""

# isort: off
# Import order is registration order: the value-based estimators, then the group baselines.
from rl2fx.returns.gae import discounted, gae, n_step, td_lambda
from rl2fx.returns.offpolicy import clipped_is, retrace, vtrace
from rl2fx.returns.multistep import multistep
from rl2fx.returns.group import (
    dr_grpo,
    gpg,
    grpo,
    grpo_passk,
    opo,
    reinforce,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
)
from rl2fx.returns.variants import gdpo, grpo_batch_std, optimal_token_baseline
# isort: on
from rl2fx.returns._backends.workspace import release_workspace
from rl2fx.returns.registry import (
    Estimator,
    check_hyperparameters,
    get_estimator,
    list_estimators,
    register_estimator,
    unregister_estimator,
)
from rl2fx.returns.scan import reverse_scan
from rl2fx.returns.unified import advantages, compute_advantages_unified
from rl2fx.returns.whiten import masked_mean, masked_std, masked_sum, masked_var, whiten

__all__ = [
    "reverse_scan",
    "gae",
    "td_lambda",
    "discounted",
    "n_step",
    "vtrace",
    "retrace",
    "clipped_is",
    "multistep",
    "reinforce",
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "remax",
    "opo",
    "gpg",
    "grpo_passk",
    "reinforce_pp_baseline",
    "grpo_batch_std",
    "gdpo",
    "optimal_token_baseline",
    "whiten",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_std",
    "advantages",
    "compute_advantages_unified",
    "Estimator",
    "register_estimator",
    "unregister_estimator",
    "list_estimators",
    "get_estimator",
    "check_hyperparameters",
    "release_workspace",
]
