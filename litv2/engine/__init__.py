"""The training / evaluation engine. Read ``trainer.py`` top to bottom first."""
from .cli import main_guard, rank_zero_hydra_overrides
from .evaluate import evaluate, load_weights, run_eval
from .trainer import NonFiniteLoss, Progress, train, train_one_epoch
