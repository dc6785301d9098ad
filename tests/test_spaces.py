"""Every supported action/observation space and policy runs; unsupported ones are refused clearly."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv

from sb3_trpo import TRPO
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv

IMAGE_OBS = spaces.Box(0, 255, shape=(36, 36, 1), dtype=np.uint8)

CASES = {
    # name: (policy, env factory, extra TRPO kwargs)
    **{
        f"mlp-{name}": ("MlpPolicy", lambda space=space: RandomEnv(BOX_OBS, space), {})
        for name, space in ACTION_SPACES.items()
    },
    "mlp-box-gsde": ("MlpPolicy", lambda: RandomEnv(BOX_OBS, ACTION_SPACES["box"]), {"use_sde": True, "sde_sample_freq": 4}),
    "mlp-discrete-obs": ("MlpPolicy", lambda: RandomEnv(spaces.Discrete(5), ACTION_SPACES["discrete"]), {}),
    "mlp-multidiscrete-obs": ("MlpPolicy", lambda: RandomEnv(spaces.MultiDiscrete([3, 4]), ACTION_SPACES["box"]), {}),
    "mlp-multibinary-obs": ("MlpPolicy", lambda: RandomEnv(spaces.MultiBinary(4), ACTION_SPACES["multibinary"]), {}),
    "cnn-discrete": (
        "CnnPolicy",
        lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True),
        {"policy_kwargs": dict(features_extractor_kwargs=dict(features_dim=16))},
    ),
    "cnn-box": (
        "CnnPolicy",
        lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=False),
        {"policy_kwargs": dict(features_extractor_kwargs=dict(features_dim=16))},
    ),
    "multiinput-grid": ("MultiInputPolicy", lambda: SimpleMultiObsEnv(random_start=True), {}),
    "multiinput-dict-box": (
        "MultiInputPolicy",
        lambda: RandomEnv(spaces.Dict({"vec": BOX_OBS, "flag": spaces.Discrete(2)}), ACTION_SPACES["box"]),
        {"sub_sampling_factor": 2},
    ),
    "multiinput-dict-image": (
        "MultiInputPolicy",
        lambda: RandomEnv(spaces.Dict({"vec": BOX_OBS, "img": IMAGE_OBS}), ACTION_SPACES["multidiscrete"]),
        {"policy_kwargs": dict(features_extractor_kwargs=dict(cnn_output_dim=8))},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_learns_and_predicts_on_every_supported_space(case):
    policy, make_env, kwargs = CASES[case]
    env = make_env()
    model = TRPO(policy, env, n_steps=32, batch_size=16, n_critic_updates=2, seed=0, **kwargs)
    for update in range(2):
        before = [p.detach().clone() for p in model._actor_view.parameters] if update else None
        model.learn(32, reset_num_timesteps=update == 0)
        logged = model.logger.name_to_value
        # every update is a real trust-region step: accepted, improving the surrogate, inside the trust region
        assert logged["train/is_line_search_success"] == 1.0
        assert logged["train/surrogate_improvement"] > 0
        assert 0 < logged["train/kl_divergence_loss"] <= model.target_kl
        if before is not None:
            assert any(not th.equal(b, p) for b, p in zip(before, model._actor_view.parameters, strict=True))
    assert model._n_updates == 2
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(np.asarray(action, dtype=env.action_space.dtype).reshape(env.action_space.shape))


@pytest.mark.parametrize(
    "action_space",
    [
        spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))),
        spaces.Dict({"move": spaces.Discrete(2)}),
    ],
    ids=["tuple", "dict"],
)
def test_unsupported_action_space_is_refused(action_space):
    with pytest.raises(ValueError, match=r"does not support the action space .* allowed action spaces are Discrete, Box"):
        TRPO("MlpPolicy", RandomEnv(BOX_OBS, action_space))


@pytest.mark.parametrize(
    "observation_space",
    [
        spaces.Tuple((BOX_OBS, spaces.Discrete(2))),
        spaces.Dict({"outer": spaces.Dict({"inner": BOX_OBS})}),
        spaces.Dict({"pair": spaces.Tuple((BOX_OBS, BOX_OBS))}),
    ],
    ids=["tuple", "nested-dict", "tuple-in-dict"],
)
def test_unsupported_observation_space_is_refused(observation_space):
    with pytest.raises(ValueError, match=r"does not support the observation space .* or a Dict of those \(not nested\)"):
        TRPO("MultiInputPolicy", RandomEnv(observation_space, ACTION_SPACES["discrete"]))
