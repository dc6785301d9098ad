"""Policies for TRPO: SB3's actor-critic policies, under the names SB3 users know.

TRPO needs nothing beyond an ``ActorCriticPolicy``: the actor parameters are found structurally at the first
update (see :mod:`sb3_trpo.actor`), so subclasses with custom networks work as they are.
"""

from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy

MlpPolicy = ActorCriticPolicy
CnnPolicy = ActorCriticCnnPolicy
MultiInputPolicy = MultiInputActorCriticPolicy

__all__ = ["CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
