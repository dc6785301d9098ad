"""Trust Region Policy Optimization for Stable-Baselines3."""

from sb3_trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo.trpo import TRPO

__version__ = "0.1.0"

__all__ = ["TRPO", "CnnPolicy", "MlpPolicy", "MultiInputPolicy", "__version__"]
