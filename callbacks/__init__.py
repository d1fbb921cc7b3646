"""Lightning callbacks for lit_td3, plugged in by the YAML configs (``lit_td3`` itself never imports them)."""

from callbacks.alerts import GradientAlertCallback
from callbacks.checkpoint import EnvStepCheckpoint
from callbacks.evaluation import EvaluationCallback
from callbacks.progress import EnvStepProgressBar

__all__ = ["EnvStepCheckpoint", "EnvStepProgressBar", "EvaluationCallback", "GradientAlertCallback"]
