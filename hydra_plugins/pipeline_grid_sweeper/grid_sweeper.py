"""hydra/sweeper=grid (conf/hydra/sweeper/grid.yaml, the default): Hydra's basic sweeper, the grid of the sweep's
values, but the jobs that the sweep's callback composed and validated (pipeline.launch.compose) are not composed
once more before their launch: Hydra's check that a batch composes took 0.1 s a job in the sweep's process,
while the first baseline trained. It lives under hydra_plugins because Hydra instantiates sweepers from that
package only.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins import basic_sweeper

from pipeline import launch


class BasicSweeper(basic_sweeper.BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal([overrides for overrides in batch if not launch.composed(overrides)])
