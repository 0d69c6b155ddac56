"""bmad: a benchmark harness for medical image anomaly detection."""

__version__ = "0.1.0"
