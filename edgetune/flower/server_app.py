"""edgetune ServerApp: read the run config, hand over to the round loop (wiring; edgetune/project.py names it)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgetune.flower import server_loop

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by ``context.run_config``."""
    server_loop.run(grid, context)
