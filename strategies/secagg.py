"""SecAgg+ wiring: Flower's SecAgg+ fit workflow from the experiment's settings, and
its client-level DP variant that releases every round.

The clients' side (clipping to the sensitivity before masking) is
:func:`fedlora.core.secure.prepare_update`; the settings and their checks are in
:mod:`fedlora.core.secure`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.server import Grid
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from fedlora.core.secure import SecAggSettings
from strategies.client_dp import ClientLevelDP


class ClientDPSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ under client-level DP: every round releases the mechanism.

    Flower's SecAgg+ halts a round it cannot finish (fewer than two clients drawn, or
    too few left to unmask) without calling ``aggregate_fit``. Under client-level DP the
    round's Poisson draw must still be released as the subsampled Gaussian the ledger
    composes. Releasing noise alone would not be that mechanism: whether the clients'
    sum is included would then depend on how many clients were drawn, and adding one
    client could move the release by the whole sum. So the same drawn clients are asked
    again without masking (the server, which adds the noise, is trusted with single
    updates under client-level DP) and the round is released as usual; the log says so.
    """

    def __call__(self, grid: Grid, context: Context) -> None:
        super().__call__(grid, context)
        strategy: ClientLevelDP = context.strategy
        if strategy.completed_round < strategy.started_round:
            # Not logged: that it halted says the draw was small (the server-internal record has it).
            strategy.secagg_halted(strategy.started_round)
            with strategy.replaying():
                default_fit_workflow(grid, context)


def secagg_workflow(settings: SecAggSettings, client_dp: bool = False) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow: the strategy then sees only the unmasked sum."""
    workflow = ClientDPSecAggPlusWorkflow if client_dp else SecAggPlusWorkflow
    return workflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=settings.timeout,
    )
