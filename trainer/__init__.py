"""handgrad's training: Lightning around the hand-written math in ``models``."""

from trainer.callbacks import Convergence, Summary
from trainer.data import ClassificationData, CSVData, DataError, IndexBatches, LineData, RegressionData, TensorData
from trainer.distributed import HandgradDDPStrategy  # registers it as Lightning's "ddp"
from trainer.module import BackpropModule, ConfigError
from trainer.sgd import SGD

__all__ = [
    "SGD",
    "BackpropModule",
    "CSVData",
    "ClassificationData",
    "ConfigError",
    "Convergence",
    "DataError",
    "HandgradDDPStrategy",
    "IndexBatches",
    "LineData",
    "RegressionData",
    "Summary",
    "TensorData",
]
