"""Deep SVDD (Ruff et al., ICML 2018): a bias-free LeNet trained to map normal images close to a
fixed hypersphere centre; the score is the squared distance to it. Registers ``deepsvdd``."""

from algorithms.deepsvdd.algorithm import DeepSVDD
from algorithms.deepsvdd.torch_model import LeNetAutoencoder, LeNetEncoder, gcn_l1, init_center, svdd_scores

__all__ = ["DeepSVDD", "LeNetAutoencoder", "LeNetEncoder", "gcn_l1", "init_center", "svdd_scores"]
