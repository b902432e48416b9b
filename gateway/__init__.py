"""parking-gateway: the edge daemon of a car park."""

import sys

__version__ = "0.1.0"

# structlog imports rich for its console renderer whenever rich is installed (amqtt -> typer brings it): about
# 15 MiB resident that the JSON log lines never use. Off a terminal, where logs are JSON (gateway/logs.py), hide
# it before anything imports structlog; a None entry makes `import rich` fail, and structlog then does without.
if "rich" not in sys.modules and not sys.stdout.isatty():
    sys.modules["rich"] = None  # type: ignore[assignment]
