"""Generated Triton for fused linear epilogues, and a readable dump of what was generated."""
from .epilogues import (
    ACTIVATIONS,
    STEPS,
    dump,
    epilogue,
    operand_arg,
    out_features,
    pair_channels,
    parse,
    reads_operand,
    source,
)

__all__ = ["ACTIVATIONS", "STEPS", "dump", "epilogue", "operand_arg", "out_features", "pair_channels", "parse",
           "reads_operand", "source"]
