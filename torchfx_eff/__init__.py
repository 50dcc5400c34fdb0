"""torchfx_eff: a torch.compile backend that rewrites attention and linear sites into faster kernels,
chosen per site by a cost model, checked numerically per site and at the graph's outputs, and logged.

    model = torch.compile(model, backend="torchfx_eff")
    model(*inputs)
    print(torchfx_eff.last_report())
"""
from .backend import Backend, backend
from .calibration import calibrate_activations
from .config import Config
from .memory import restore_weights
from .report import Report, last_report, reset

__all__ = ["Backend", "Config", "Report", "backend", "calibrate_activations", "last_report", "reset", "restore_weights"]
__version__ = "0.1.0"
