"""The checks behind ``lora validate`` (the stage is ``lora_cli.stages.validate``).

``report``: the findings document; ``numeric``: tensor comparison in ulp and tolerances;
``files``: reader errors, readability and the checksum manifest; ``weights``: structural
checks of a checkpoint or weights file; ``recompute``: PATH against BASE + ADAPTER;
``adapter``: an adapter folder, alone or against a base.
"""
