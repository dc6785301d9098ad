"""Checkpoints: damaged files are named as such, saving is atomic, sb3-contrib models migrate, training resumes."""

import io
import stat
import warnings
import zipfile

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sb3_trpo.critic
import sb3_trpo.trpo
from sb3_trpo import TRPO
from tests.helpers import import_sb3_contrib

SMALL = dict(n_steps=64, batch_size=32, n_critic_updates=2, policy_kwargs=dict(net_arch=[16]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.zip"
    model = TRPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL)
    model.learn(64)
    model.save(path)
    return path, model


def observations() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)


def test_truncated_file_is_named_as_such(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 10, 100):
        truncated = tmp_path / f"truncated_{keep}.zip"
        truncated.write_bytes(data[:keep])
        with pytest.raises(
            ValueError, match=r"Cannot load a model from .*truncated_\d+\.zip: the file is truncated or damaged"
        ):
            TRPO.load(truncated)


def test_damaged_member_is_named_as_such(saved, tmp_path):
    path, _ = saved
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("policy.pth")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data = bytearray(path.read_bytes())
    for i in range(start + 50, start + 60):  # flip bytes inside the stored policy weights
        data[i] ^= 0xFF
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged"):
        TRPO.load(damaged)


def test_not_a_model_is_named_as_such(tmp_path):
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"a zip archive but not a Stable-Baselines3 model \(it has no 'data', 'policy.pth'"):
        TRPO.load(other)
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="truncated or damaged"):
        TRPO.load(text)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        TRPO.load(tmp_path / "nowhere")


def test_load_from_file_object_and_without_suffix(saved):
    path, model = saved
    buffer = io.BytesIO(path.read_bytes())
    loaded = TRPO.load(buffer)
    np.testing.assert_array_equal(
        loaded.predict(observations(), deterministic=True)[0], model.predict(observations(), deterministic=True)[0]
    )
    TRPO.load(str(path)[: -len(".zip")])  # SB3 adds the suffix


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_save_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch, error):
    path, model = saved
    target = tmp_path / "model.zip"
    target.write_bytes(path.read_bytes())
    original = OnPolicyAlgorithm.save

    def save_half(self, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")  # something was written when the failure hits
        raise error("disk full" if error is RuntimeError else "")

    monkeypatch.setattr(OnPolicyAlgorithm, "save", save_half)
    with pytest.raises(error):
        model.save(target)
    monkeypatch.setattr(OnPolicyAlgorithm, "save", original)
    assert target.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]  # no temporary file left behind
    TRPO.load(target)


def test_save_adds_the_suffix_and_creates_folders(saved, tmp_path):
    _, model = saved
    model.save(tmp_path / "deep" / "er" / "model")
    assert (tmp_path / "deep" / "er" / "model.zip").is_file()
    buffer = io.BytesIO()
    model.save(buffer)
    assert zipfile.is_zipfile(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("suffix", ["model.zip", "model"], ids=["with-suffix", "suffix-added"])
def test_save_over_a_symlink_writes_the_file_it_points_to(saved, tmp_path, suffix):
    _, model = saved
    real = tmp_path / "store" / "model.zip"
    real.parent.mkdir()
    real.write_bytes(b"an older checkpoint")
    link = tmp_path / "latest.zip"
    link.symlink_to(real)
    model.save(tmp_path / ("latest.zip" if suffix == "model.zip" else "latest"))
    assert link.is_symlink(), "the link was replaced by a file"
    assert link.resolve() == real.resolve()
    assert zipfile.is_zipfile(real)
    assert not [p.name for p in tmp_path.rglob(".*partial*")]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_save_over_a_file_keeps_its_permissions(saved, tmp_path, mode):
    _, model = saved
    path = tmp_path / "model.zip"
    path.write_bytes(b"an older checkpoint")
    path.chmod(mode)
    model.save(path)
    assert zipfile.is_zipfile(path)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_new_file_gets_the_permissions_open_gives(saved, tmp_path):
    _, model = saved
    model.save(tmp_path / "model.zip")
    (tmp_path / "plain").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "model.zip").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_sb3_contrib_model_loads_and_acts_identically(tmp_path):
    sb3_contrib = import_sb3_contrib()
    theirs = sb3_contrib.TRPO("MlpPolicy", "Pendulum-v1", seed=0, use_sde=True, **SMALL)
    theirs.learn(128)
    theirs.save(tmp_path / "contrib_model")
    ours = TRPO.load(tmp_path / "contrib_model", env=make_vec_env("Pendulum-v1", n_envs=1, seed=1))
    obs = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    np.testing.assert_array_equal(ours.predict(obs, deterministic=True)[0], theirs.predict(obs, deterministic=True)[0])
    for name in (
        "cg_max_steps",
        "cg_damping",
        "line_search_shrinking_factor",
        "line_search_max_iter",
        "target_kl",
        "n_critic_updates",
    ):
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.num_timesteps == 128
    ours.learn(128, reset_num_timesteps=False)
    assert ours.num_timesteps == 256
    assert all(bool(th.isfinite(p).all()) for p in ours.policy.parameters())


def test_save_load_continue_keeps_the_timestep_count_in_the_logs(tmp_path):
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), seed=0, tensorboard_log=str(tmp_path), **SMALL)
    model.learn(192, tb_log_name="run")
    model.save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model", env=make_vec_env("CartPole-v1", n_envs=1, seed=1), tensorboard_log=str(tmp_path))
    loaded.learn(192, reset_num_timesteps=False, tb_log_name="run")
    assert loaded.num_timesteps == 384
    assert loaded._n_updates == 6
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # the same TensorBoard run continues
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/kl_divergence_loss")]
    assert steps == sorted(steps)
    assert steps[-1] > 192


def test_settings_passed_to_load_are_checked(saved):
    path, _ = saved
    with pytest.raises(ValueError, match=r"target_kl=-1\.0 is not allowed: target_kl must be"):
        TRPO.load(path, target_kl=-1.0)
    with pytest.raises(ValueError, match=r"n_steps=0 is not allowed"):
        TRPO.load(path, n_steps=0)


def test_the_rollout_size_is_checked_with_the_settings_the_loaded_model_has(saved):
    path, _ = saved
    env = make_vec_env("CartPole-v1", n_envs=1)
    with pytest.raises(ValueError, match=r"n_steps \* n_envs = 1 \* 1 = 1: with normalize_advantage=True"):
        TRPO.load(path, env=env, n_steps=1)
    # the saved n_steps=64 with a new batch size that does not divide it
    with pytest.warns(UserWarning, match=r"minibatch size 48 does not divide the rollout size n_steps \* n_envs = 64"):
        TRPO.load(path, env=env, batch_size=48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TRPO.load(path, env=env)  # the saved settings fit: nothing to say


def test_the_fused_adam_choice_is_not_saved_and_follows_the_device(saved, tmp_path, monkeypatch):
    path, model = saved
    assert model.policy.optimizer.param_groups[0]["fused"] is True
    assert model.policy_kwargs == SMALL["policy_kwargs"]  # what the user passed, nothing added
    # so the user's own policy_kwargs are accepted again by SB3's load, which compares them with the saved ones
    TRPO.load(path, policy_kwargs=SMALL["policy_kwargs"])
    # a device without the fused kernel: the loaded optimizer runs the plain one, with the saved Adam state
    monkeypatch.setattr(sb3_trpo.critic, "FUSED_ADAM_DEVICES", ())
    loaded = TRPO.load(path, env=make_vec_env("CartPole-v1", n_envs=1))
    assert all(group["fused"] is False for group in loaded.policy.optimizer.param_groups)
    before, after = model.policy.optimizer.state_dict()["state"], loaded.policy.optimizer.state_dict()["state"]
    assert before.keys() == after.keys()
    for key in before:
        th.testing.assert_close(after[key]["exp_avg"], before[key]["exp_avg"], rtol=0, atol=0)
    loaded.learn(64)
    assert all(group["fused"] is False for group in loaded.policy.optimizer.param_groups)
    # and a model built here from the start never uses it
    assert TRPO("MlpPolicy", "CartPole-v1", **SMALL).policy.optimizer.param_groups[0]["fused"] is False
