"""Cost model: device specs, roofline formulas over symbolic sizes, measured calibration, the chooser."""
from . import formulas
from .calibrate import Calibration, seconds, site_key
from .choose import MARGIN, MEMORY_SLOWDOWN, candidates, ranked
from .devices import SPECS, DeviceSpec, detect
from .regimes import SPLIT_ROWS, regime_hints

__all__ = ["MARGIN", "MEMORY_SLOWDOWN", "SPECS", "SPLIT_ROWS", "Calibration", "DeviceSpec", "candidates", "detect", "formulas", "ranked",
           "regime_hints", "seconds", "site_key"]
