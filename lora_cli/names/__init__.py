"""Names: adapter (runtime) names ↔ checkpoint names, below every stage and exporter.

``pair_names(adapter_targets, checkpoint_names, config, accept=...) -> Resolution``.
"""

from lora_cli.names.pairing import (
    CONVERTED,
    IDENTITY,
    MISSING,
    Renamed,
    Resolution,
    pair_names,
)

__all__ = ["CONVERTED", "IDENTITY", "MISSING", "Renamed", "Resolution", "pair_names"]
