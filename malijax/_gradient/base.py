"""The gradient-strategy seam.

A strategy receives the problem and the static config and returns the loop's output.
It decides which while loop the forward runs in and wraps it in a custom VJP if it
has one; it never writes a stepping loop of its own (DESIGN.md §2).
"""

import abc

import equinox as eqx


class AbstractGradient(eqx.Module):
    """Base class of the gradient strategies."""

    def check(self, solver, config) -> None:
        """Raise `TypeError`/`ValueError` at trace time if this strategy cannot serve
        `solver` under `config`. The default accepts everything."""
        del solver, config

    # Strategies that rebuild states (MALI) set this and receive, from the reverse
    # sweep, the worst relative difference between a rebuilt state and the true one
    # (stored, or the initial state) and the time where it occurred.
    reconstructs = False

    def report_reconstruction(self, error, t, *, dtype, config) -> None:
        del error, t, dtype, config

    def supports_forward_mode(self, config) -> bool:
        """Whether `jax.jvp`/`jax.jacfwd` can differentiate this strategy's solve
        under `config` (not through a custom VJP)."""
        del config
        return False

    def restarts(self, config, num_out, y0):
        """The whole states the forward keeps for the reverse sweep to restart from
        (`malijax._loop.Restarts`), or `None`."""
        del config, num_out, y0
        return None

    @abc.abstractmethod
    def apply(self, problem, config):
        """Run the forward solve; returns `malijax._loop.LoopOutput`."""
