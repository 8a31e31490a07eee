import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._batching import call_field, value_and_vjp
from .._misc import tree_add, tree_dot, tree_lincomb
from .._solver import AbstractRungeKutta
from .aca import ACA


class SymplecticAdjoint(ACA):
    r"""The symplectic adjoint method (Matsubara, Miyatake & Yaguchi, NeurIPS 2021).

    Stores the state at every accepted step, like `ACA`. The backward recomputes the
    stage states `X_i` of one step from its checkpoint (s - 1 evaluations) and sweeps
    the stages in reverse, one VJP of `func` at a time:

        ∂L/∂k_i = h b_i λ_{k+1} + h Σ_{m>i} a_mi ∂L/∂X_m,   ∂L/∂X_i = J_iᵀ ∂L/∂k_i,
        λ_k = λ_{k+1} + Σ_i ∂L/∂X_i,   θ̄ += Σ_i f_θ,iᵀ ∂L/∂k_i.

    This is reverse-mode AD of the Runge--Kutta step organised stage by stage; it is the
    adjoint system integrated by the symplectic partitioned RK partner of the tableau
    (`Ã_ij = b_j - b_j a_ji / b_i`), so it is exact for the computed discretisation.
    Stages that no later stage, no output weight and no interpolated output use (the
    FSAL error stage of Dopri5, Tsit5 and Bosh3, when no output falls inside a step)
    are skipped. Outputs inside a step add `h Σ_p W_ip C̄_p` to `∂L/∂k_i` (the
    interpolant `y + h Σ_i b_i(θ) k_i`, `malijax._dense`). Memory: one checkpoint per step plus `s`
    stage states and a single `func` graph, where `ACA`'s local VJP holds all `s`
    stages' graphs at once.

    Needs an explicit Runge--Kutta solver.

    ??? cite "Reference"
        Matsubara, Miyatake & Yaguchi, "Symplectic adjoint method for exact gradient of
        neural ODE with minimal memory", NeurIPS 2021.
    """

    def check(self, solver, config):
        del config
        if not isinstance(solver, AbstractRungeKutta):
            raise TypeError(
                f"SymplecticAdjoint() needs an explicit Runge--Kutta solver (Euler, Midpoint, "
                f"Heun, RK4, Bosh3, Dopri5, Tsit5), not {type(solver).__name__}. For "
                f"{type(solver).__name__} use gradient=mj.MALI(), mj.ACA() or mj.Direct()."
            )

    def step_vjp(self, solver, func, args, c0, t, h, ct_x1, ct_dense=None):
        tab = solver.tableau
        s = tab.num_stages
        dtype = h.dtype
        y = c0
        # A stage matters if an output weight, a later stage or the interpolant uses
        # it; trailing unused stages (the FSAL error stage) are dropped.
        weights = tab.dense_weights()
        used = [tab.b[i] != 0 or any(tab.a[m - 1][i] != 0 for m in range(i + 1, s))
                or (ct_dense is not None and bool(np.any(weights[i]))) for i in range(s)]
        s_used = max(i for i in range(s) if used[i]) + 1
        # ∂L/∂k_i from the interpolated outputs, divided by h: Σ_p W[i, p-1] C̄_p.
        ct_k_dense = [None] * s_used
        if ct_dense is not None:
            stacked = jtu.tree_map(
                lambda c: jnp.tensordot(jnp.asarray(weights[:s_used], c.dtype), c[1:], axes=1),
                ct_dense,
            )
            ct_k_dense = [jtu.tree_map(lambda c: c[i], stacked) if np.any(weights[i]) else None
                          for i in range(s_used)]

        # Recompute the stage inputs X_i without a graph: s_used - 1 evaluations.
        xs, ks = [y], []
        for i in range(1, s_used):
            ks.append(func(t + tab.c[i - 1] * h, xs[i - 1], args))
            xs.append(tree_lincomb(y, h, tab.a[i - 1], ks))

        lam1 = ct_x1
        lam0 = lam1
        acc = [None] * s_used  # h Σ_{m>i} a_mi ∂L/∂X_m, filled in as the sweep goes
        k_last = None
        g_func = g_args = None
        g_t = jnp.zeros((), dtype)
        g_h = jnp.zeros((), dtype)
        for i in reversed(range(s_used)):
            dk = jtu.tree_map(lambda l: (h * tab.b[i]).astype(l.dtype) * l, lam1)
            if acc[i] is not None:
                dk = tree_add(dk, acc[i])
            if ct_k_dense[i] is not None:
                dk = tree_add(dk, jtu.tree_map(lambda c: h.astype(c.dtype) * c, ct_k_dense[i]))
            k_i, (gf_i, ga_i), (gt_i, dx_i) = value_and_vjp(
                call_field, (func, args), (t + tab.c[i] * h, xs[i]), dk
            )
            if i == s_used - 1:
                k_last = k_i  # the one stage value the recompute did not produce
            gt_i = jnp.zeros((), dtype) if gt_i is None else gt_i
            lam0 = tree_add(lam0, dx_i)
            g_func, g_args = tree_add(g_func, gf_i), tree_add(g_args, ga_i)
            g_t = g_t + gt_i
            g_h = g_h + tab.c[i] * gt_i  # stage time t + c_i h
            if i > 0:  # X_i = y + h Σ_j a_ij k_j
                g_h = g_h + tree_dot(dx_i, tree_lincomb(None, jnp.ones((), dtype), tab.a[i - 1], ks), dtype)
            for j in range(i):
                if tab.a[i - 1][j] != 0:
                    term = jtu.tree_map(lambda d: (h * tab.a[i - 1][j]).astype(d.dtype) * d, dx_i)
                    acc[j] = term if acc[j] is None else tree_add(acc[j], term)
        # y1 = y + h Σ_i b_i k_i
        all_k = ks[: s_used - 1] + [k_last]
        g_h = g_h + tree_dot(lam1, tree_lincomb(None, jnp.ones((), dtype), tab.b[:s_used], all_k), dtype)
        if ct_dense is not None:  # y(θ) = C_0 + ..., C_0 = y; C_p ∝ h
            lam0 = tree_add(lam0, jtu.tree_map(lambda c: c[0], ct_dense))
            for ct_k, k_i in zip(ct_k_dense, all_k):
                if ct_k is not None:
                    g_h = g_h + tree_dot(ct_k, k_i, dtype)
        return lam0, g_func, g_args, g_t, g_h
