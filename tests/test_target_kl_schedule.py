"""``target_kl`` as a schedule of the remaining progress, as SB3 allows for ``learning_rate``."""

import math

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule

from sb3_trpo import TRPO


def _model(target_kl, **kwargs) -> TRPO:
    return TRPO(
        "MlpPolicy", make_vec_env("CartPole-v1", 2, seed=0), n_steps=64, batch_size=128, seed=0, target_kl=target_kl, **kwargs
    )


def _per_update(model: TRPO, timesteps: int) -> list[dict[str, float]]:
    """The logged train/* values and the progress remaining of every update of ``learn(timesteps)``."""
    records: list[dict[str, float]] = []
    train = model.train

    def recording_train() -> None:
        progress = model._current_progress_remaining
        train()
        records.append({**model.logger.name_to_value, "progress": progress})

    model.train = recording_train  # type: ignore[method-assign]
    model.learn(timesteps)
    return records


def test_each_update_uses_the_schedule_at_its_progress_and_keeps_within_it():
    schedule = LinearSchedule(0.05, 0.002, 1.0)
    records = _per_update(_model(schedule), 128 * 6)
    assert len(records) == 6
    for record in records:
        assert record["train/target_kl"] == pytest.approx(schedule(record["progress"]))
        if record["train/is_line_search_success"]:
            assert 0 < record["train/kl_divergence_loss"] <= record["train/target_kl"]
    radii = [r["train/target_kl"] for r in records]
    assert radii == sorted(radii, reverse=True)
    assert radii[0] > radii[-1]


def test_a_constant_schedule_is_the_same_as_the_number():
    # one after the other: each model seeds torch's global generator when it is built
    number = _model(0.02)
    number.learn(128 * 3)
    schedule = _model(lambda progress: 0.02)
    schedule.learn(128 * 3)
    for a, b in zip(number.policy.parameters(), schedule.policy.parameters(), strict=True):
        assert th.equal(a, b)


def test_a_radius_of_zero_leaves_the_policy_unchanged_without_a_skip_warning(recwarn):
    model = _model(lambda progress: 0.0 if progress < 0.6 else 0.01)
    records = _per_update(model, 128 * 4)
    zero = [r for r in records if r["train/target_kl"] == 0.0]
    assert zero, "the schedule reached 0 before the end"
    for record in zero:
        assert record["train/is_line_search_success"] == 0.0
        assert record["train/kl_divergence_loss"] == 0.0
    assert model._skipped_policy_steps == 0
    assert not [w for w in recwarn if "policy step" in str(w.message)]


@pytest.mark.parametrize("bad", [math.nan, -0.01, math.inf])
def test_a_schedule_that_goes_bad_mid_training_raises_before_changing_anything(bad):
    # bad only between the progress points the constructor samples (1, 0.5, 0): the 5th of 8 updates hits it
    model = _model(lambda progress: bad if 0.3 < progress < 0.4 else 0.01)
    with pytest.raises(ValueError, match=r"The target_kl schedule returned .* at progress_remaining=0.375: it must"):
        _per_update(model, 128 * 8)
    assert model._n_updates == 4
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.raises(ValueError, match="target_kl schedule"):
        model.train()  # the same rollout, the same progress: the same refusal, and nothing moved
    for a, b in zip(before, model.policy.parameters(), strict=True):
        assert th.equal(a, b)


@pytest.mark.parametrize(
    "bad", [lambda progress: 0.0, lambda progress: math.nan, lambda progress: "wide", 0.0, -1.0, math.nan]
)
def test_invalid_radii_are_refused_at_construction(bad):
    with pytest.raises(ValueError, match=r"target_kl=.* is not allowed: target_kl must be a finite number > 0, or a schedule"):
        _model(bad)


def test_a_schedule_survives_save_and_load(tmp_path):
    schedule = LinearSchedule(0.05, 0.01, 1.0)
    model = _model(schedule)
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model", env=make_vec_env("CartPole-v1", 2, seed=0))
    assert callable(loaded.target_kl)
    assert loaded.target_kl(0.5) == pytest.approx(schedule(0.5))
    loaded.learn(128, reset_num_timesteps=False)


def test_a_linear_schedule_is_read_at_zero_when_the_budget_overshoots():
    """SB3's progress remaining is slightly negative at the last update when the budget is not a multiple of the
    rollout size; ``lambda p: 0.02 * p`` would then return a negative radius."""
    from sb3_trpo.validation import target_kl_at

    assert target_kl_at(lambda p: 0.02 * p, -0.00096) == 0.0
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, target_kl=lambda p: 0.02 * p, seed=0)
    model.learn(100)  # two rollouts of 64: progress remaining -0.28 at the second update
    assert model.logger.name_to_value["train/target_kl"] == 0.0
