"""Trust Region Policy Optimization for Stable-Baselines3."""

from typing import Any

from sb3_trpo.checkpoints import load_latest_checkpoint
from sb3_trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo.trpo import TRPO

__version__ = "0.1.0"

__all__ = [
    "TRPO",
    "CnnPolicy",
    "MaskableRecurrentTRPO",
    "MaskableTRPO",
    "MlpPolicy",
    "MultiInputPolicy",
    "RecurrentTRPO",
    "__version__",
    "load_latest_checkpoint",
]


def __getattr__(name: str) -> Any:
    # MaskableTRPO, RecurrentTRPO and MaskableRecurrentTRPO need sb3-contrib (an optional extra): imported on first
    # use, so `import sb3_trpo` never needs it
    if name == "MaskableTRPO":
        from sb3_trpo.maskable import MaskableTRPO

        return MaskableTRPO
    if name == "MaskableRecurrentTRPO":
        from sb3_trpo.maskable_recurrent import MaskableRecurrentTRPO

        return MaskableRecurrentTRPO
    if name == "RecurrentTRPO":
        from sb3_trpo.recurrent import RecurrentTRPO

        return RecurrentTRPO
    raise AttributeError(f"module 'sb3_trpo' has no attribute {name!r}")
