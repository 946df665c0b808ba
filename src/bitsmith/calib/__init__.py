"""Calibration data (token batches from local text) and streaming layer statistics."""

from bitsmith.calib.data import DEFAULT_CALIB_TEXT, CalibrationConfig, calibration_batches, read_calibration_text
from bitsmith.calib.stats import StatsAccumulator

__all__ = ["DEFAULT_CALIB_TEXT", "CalibrationConfig", "StatsAccumulator", "calibration_batches", "read_calibration_text"]
