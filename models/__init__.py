"""handgrad's math: layers and losses whose backward passes are written by hand.

Everything here imports torch only (never lightning), so it can be read, tested and reused alone.
"""

from models.activations import ACTIVATIONS, Identity, ReLU, Sigmoid, Tanh, activation
from models.layer import Layer
from models.linear import Linear
from models.losses import LOSSES, REDUCTIONS, Loss, SoftmaxCrossEntropy, SquaredError, make_loss
from models.mlp import MLP, Sequential

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MLP",
    "REDUCTIONS",
    "Identity",
    "Layer",
    "Linear",
    "Loss",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "Tanh",
    "activation",
    "make_loss",
]
