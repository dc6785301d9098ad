"""Checkpoints: damaged files are named as such, saving is atomic, sb3-contrib models migrate, training resumes."""

import io
import zipfile

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sb3_trpo.trpo
from sb3_trpo import TRPO

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
    original = sb3_trpo.trpo.OnPolicyAlgorithm.save

    def save_half(self, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")  # something was written when the failure hits
        raise error("disk full" if error is RuntimeError else "")

    monkeypatch.setattr(sb3_trpo.trpo.OnPolicyAlgorithm, "save", save_half)
    with pytest.raises(error):
        model.save(target)
    monkeypatch.setattr(sb3_trpo.trpo.OnPolicyAlgorithm, "save", original)
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


def test_sb3_contrib_model_loads_and_acts_identically(tmp_path):
    sb3_contrib = pytest.importorskip("sb3_contrib")
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
