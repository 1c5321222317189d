"""Stateless advantage and return estimators over ``[*batch, time]`` tensors.

See ``docs/returns.md`` for the formulas, references and the mask / terminated /
done conventions.
"""

from rl2fx.returns.gae import discounted, gae, n_step, td_lambda
from rl2fx.returns.scan import reverse_scan

__all__ = ["reverse_scan", "gae", "td_lambda", "discounted", "n_step"]
