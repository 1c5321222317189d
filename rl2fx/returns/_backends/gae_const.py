r"""GAE with constant ``gamma``, ``lamda`` and no trace cuts, on CPU, ``[N, T]`` float tensors.

Solved in the λ-return form (Sutton & Barto 2018, eq. 12.18),

.. math::  G_t = r_t + \gamma (1 - \lambda) V_{t+1} + \gamma\lambda G_{t+1},
           \qquad A_t = G_t - V_t,

which needs one pass to form the scan's input instead of two for :math:`\delta_t`
(and is at least as accurate in float32: docs/performance.md).

* :func:`unmasked`: that input, then the constant-coefficient matrix-product scan
  (:func:`.gemm.scan_const`).
* :func:`k_form` (a mask and :math:`\lambda \ge 1/2`): the value of the next
  decision is never looked up. :math:`K_t = G_t + a V_t` with
  :math:`a = (1 - \lambda)/\lambda` obeys

  .. math::  K_t = (r_t + a V_t) + \gamma\lambda K_{\text{next}(t)}, \qquad K_T = V_T / \lambda,

  so :math:`A_t = K_t - V_t/\lambda` and :math:`G_t = K_t - a V_t` come from one
  masked scan with a constant coefficient (:mod:`.masked`). Subtracting
  :math:`V_t/\lambda` costs about :math:`(1 + 1/\lambda)` float32 roundings of
  :math:`|V|`, hence the bound on :math:`\lambda`.
* :func:`packed` (any other mask, or to redo a :func:`k_form` result that
  overflowed): each row's masked-in steps are packed to the left (:mod:`.packed`),
  which is exactly the definition "pack, run, scatter back".

Which one runs is decided in :func:`rl2fx.returns.scan.gae_fast_path`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx.returns._backends import packed as P
from rl2fx.returns._backends.gemm import scan_const
from rl2fx.returns._backends.masked import mask_floats, masked_const_scan_
from rl2fx.returns._backends.workspace import scratch

__all__ = ["unmasked", "k_form", "packed"]


def unmasked(r2: Tensor, v2: Tensor, *, boot: Tensor, gamma: float, lamda: float, c: float) -> tuple[Tensor, Tensor]:
    """``(A, G)`` for ``r2, v2 [N, T]``, ``boot [N]``; ``c`` is ``gamma * lamda`` rounded to the dtype."""
    N, T = r2.shape
    x = scratch("gae-x", (N, T), dtype=r2.dtype, device=r2.device)
    torch.add(r2[:, :-1], v2[:, 1:], alpha=gamma * (1.0 - lamda), out=x[:, :-1])
    torch.add(r2[:, -1], boot, alpha=gamma, out=x[:, -1])  # G_T = V_T = bootstrap
    ret = scan_const(x, c=c)
    return ret - v2, ret


def k_form(
    r2: Tensor, v2: Tensor, *, mask: Tensor, boot: Tensor, lamda: float, c: float
) -> tuple[Tensor, Tensor] | None:
    """``(A, G)`` by the masked K-form scan, or ``None`` when the result is not finite
    (a non-finite input, or an overflow, possibly at a masked-out step)."""
    N, T = r2.shape
    a = (1.0 - lamda) / lamda
    x = torch.add(r2, v2, alpha=a, out=scratch("gae-x", (N, T), dtype=r2.dtype, device=r2.device))
    mf = mask_floats(mask, r2.dtype)
    k, finite = masked_const_scan_(x, mf, c=c, tail=boot / lamda)
    if not finite:
        return None
    adv = torch.addcmul(k, v2, mf, value=-1.0 / lamda)  # A = K - V / lamda
    ret = torch.addcmul(k, v2, mf, value=-a)  # G = K - a V
    return adv, ret


def packed(
    r2: Tensor, v2: Tensor, *, mask: Tensor, boot: Tensor, gamma: float, lamda: float, c: float
) -> tuple[Tensor, Tensor]:
    """``(A, G)`` by packing each row's masked-in steps, the unmasked scan, and unpacking."""
    N, T = r2.shape
    plan = P.pack_plan(mask)
    x = P.pack(r2, plan, width=T, slot="gae-r")
    vp = P.pack(v2, plan, width=T + 1, slot="gae-v")
    vp[torch.arange(N), plan.count] = boot  # V after each row's last step
    x.add_(vp[:, 1:], alpha=gamma * (1.0 - lamda))
    # G after the last step is the bootstrap: its share g*lam*V_T enters the last step
    full = (plan.count > 0).nonzero().squeeze(1)
    last = plan.count[full] - 1
    x[full, last] += c * boot[full]
    ret = scan_const(x, c=c, out=scratch("gae-ret", (N, T), dtype=r2.dtype, device=r2.device))
    adv = torch.sub(ret, vp[:, :T], out=vp[:, :T])  # G - V, in place of the packed values
    return P.unpack(adv, plan), P.unpack(ret, plan)
