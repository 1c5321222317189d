"""Controllers: KL-coefficient rules, schedules, Lagrangian constraints and adaptive batch sizing.

Each is a frozen state dataclass plus pure ``init`` / ``update`` functions;
the spec's classes (``AdaptiveKLController``, ``LagrangianConstraints``,
``AdaptiveBatchSizer``) are thin wrappers holding one state.

>>> from rl2fx import control as C
>>> s = C.kl_update(C.kl_init("exponential"), kl=0.02, step=0)
>>> round(s.coef, 4)
0.206
"""

from rl2fx.control import schedules
from rl2fx.control.batch_size import (
    AdaptiveBatchSizer,
    BatchSizeState,
    batch_size_init,
    batch_size_update,
)
from rl2fx.control.kl import (
    CONTROLLER_TYPES,
    FEEDBACK_TYPES,
    AdaptiveKLController,
    KLState,
    kl_init,
    kl_state_from_dict,
    kl_state_to_dict,
    kl_update,
)
from rl2fx.control.lagrangian import (
    LagrangianConstraints,
    LagrangianState,
    lagrangian_init,
    lagrangian_penalty,
    lagrangian_update,
)
from rl2fx.control.schedules import (
    SCHEDULES,
    cosine,
    exponential,
    linear,
    schedule_value,
    warmup_cosine,
)

__all__ = [
    "CONTROLLER_TYPES", "FEEDBACK_TYPES", "KLState", "kl_init", "kl_update", "kl_state_to_dict",
    "kl_state_from_dict", "AdaptiveKLController",
    "LagrangianState", "lagrangian_init", "lagrangian_update", "lagrangian_penalty", "LagrangianConstraints",
    "BatchSizeState", "batch_size_init", "batch_size_update", "AdaptiveBatchSizer",
    "schedules", "SCHEDULES", "schedule_value", "cosine", "linear", "exponential", "warmup_cosine",
]
