"""The train/* diagnostics reach TensorBoard on every update, with sensible values."""

import pytest
from stable_baselines3.common.env_util import make_vec_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sb3_trpo import TRPO
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv

# sb3-contrib's keys (existing dashboards keep working) and the ones sb3_trpo adds
CONTRIB_KEYS = [
    "train/policy_objective",
    "train/kl_divergence_loss",
    "train/is_line_search_success",
    "train/value_loss",
    "train/explained_variance",
]
NEW_KEYS = [
    "train/surrogate_improvement",
    "train/expected_improvement",
    "train/line_search_steps",
    "train/step_size",
    "train/cg_residual",
    "train/entropy",
    "train/target_kl",
]


def scalars(log_dir) -> dict[str, list[float]]:
    (run,) = [p for p in log_dir.iterdir() if p.is_dir()]
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize("space", ["discrete", "box"])
def test_tensorboard_has_every_key_at_every_update(tmp_path, space):
    env = make_vec_env(lambda: RandomEnv(BOX_OBS, ACTION_SPACES[space]), n_envs=1)
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=32, seed=0, tensorboard_log=str(tmp_path))
    expected = CONTRIB_KEYS + NEW_KEYS + (["train/std"] if space == "box" else [])
    recorded_per_update = []
    train = model.train

    def recording_train() -> None:
        train()
        recorded_per_update.append(set(model.logger.name_to_value))

    model.train = recording_train  # type: ignore[method-assign]
    model.learn(64 * 4)
    assert len(recorded_per_update) == 4
    for recorded in recorded_per_update:
        assert set(expected) <= recorded
    logged = scalars(tmp_path)
    for key in expected:
        assert key in logged, f"{key} missing from TensorBoard"
        # SB3 writes an update's values when the next iteration dumps its logs, so the last update is not written
        assert len(logged[key]) == 3, f"{key} not written for every update"
    assert "train/n_updates" not in logged  # SB3 keeps it out of TensorBoard


def test_diagnostics_are_consistent():
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, seed=0)
    model.learn(256)
    values = model.logger.name_to_value
    assert values["train/is_line_search_success"] == 1.0
    assert 0 < values["train/kl_divergence_loss"] <= model.target_kl
    assert values["train/surrogate_improvement"] > 0
    # the first-order prediction g·Δθ is close to the actual improvement for a small trust region
    assert values["train/surrogate_improvement"] == pytest.approx(values["train/expected_improvement"], rel=0.5)
    assert values["train/step_size"] > 0
    assert 0 <= values["train/line_search_steps"] < model.line_search_max_iter
    # 10 CG steps nearly solve this system (3e-5 here); one step alone would not (its exact value: test_step.py)
    assert 0 <= values["train/cg_residual"] < 1e-2
    assert 0 < values["train/entropy"] <= 0.6932  # two actions: at most log 2
