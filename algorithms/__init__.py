"""Built-in algorithms. Importing this package registers them (cheaply: heavy
libraries such as anomalib are imported only when an algorithm is built)."""

from algorithms import cfa, cflow, csflow, draem, ganomaly, padim, patchcore, rd4ad, stfpm  # noqa: F401  (registers them)
