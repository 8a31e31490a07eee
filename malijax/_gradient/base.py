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

    def check_reconstruction(self, rebuilt, original) -> None:
        """Called by the reverse sweep with the initial carry it rebuilt and the one the
        forward started from. Strategies that rebuild states (`MALI`) compare them; the
        others stored it, and do nothing."""
        del rebuilt, original

    @abc.abstractmethod
    def apply(self, problem, config):
        """Run the forward solve; returns `malijax._loop.LoopOutput`."""
