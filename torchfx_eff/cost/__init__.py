"""Cost model: device specs, roofline formulas over symbolic sizes, measured calibration, the chooser."""
from . import formulas
from .calibrate import Calibration, seconds, site_key
from .choose import MARGIN, candidates, ranked
from .devices import SPECS, DeviceSpec, detect

__all__ = ["MARGIN", "SPECS", "Calibration", "DeviceSpec", "candidates", "detect", "formulas", "ranked", "seconds", "site_key"]
