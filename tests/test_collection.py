"""The lean rollout collection stores exactly what SB3's ``collect_rollouts`` stores, step for step.

Every comparison runs the same seeded set-up twice, once with ``fast_collection=True`` and once with SB3's loop
(``fast_collection=False``), and requires bit-identical results: buffer fields, random generator states, what
callbacks see, and the parameters after several updates.
"""

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from sb3_trpo import TRPO, lean_forward
from sb3_trpo.lean_forward import LeanForward, lean_collection_gap
from tests.helpers import ACTION_SPACES, NaNAfter, RandomEnv

BUFFER_FIELDS = ("actions", "rewards", "episode_starts", "values", "log_probs", "advantages", "returns")

OBSERVATION_SPACES: dict[str, spaces.Space] = {
    "box": spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32),
    "discrete": spaces.Discrete(4),
    "multidiscrete": spaces.MultiDiscrete([2, 3]),
    "multibinary": spaces.MultiBinary(3),
}


def without_wall_time(info: dict[str, Any]) -> dict[str, Any]:
    """An info dict without Monitor's wall-clock time of the episode (``episode["t"]``), the one thing that differs."""
    info = dict(info)
    if "episode" in info:
        info["episode"] = {k: v for k, v in info["episode"].items() if k != "t"}
    return info


class RecordingCallback(BaseCallback):
    """Keeps a copy of every local SB3 hands to callbacks, at every step and at the rollout's end: the whole
    ``self.locals`` dict a callback reads then (it accumulates across updates, as SB3's does)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.stop_at = stop_at
        self.rollout_steps = 0

    @staticmethod
    def _copy(value: Any) -> Any:
        if isinstance(value, th.Tensor):
            return ("tensor", value.dtype, value.clone())
        if isinstance(value, np.ndarray):
            return ("array", value.dtype, value.copy())
        if isinstance(value, dict):
            return {k: RecordingCallback._copy(v) for k, v in value.items()}
        if isinstance(value, np.generic):
            return ("scalar", type(value), value.item())
        return value

    def _snapshot(self) -> dict[str, Any]:
        """Every local by value; the model's own objects by which object they are."""
        objects = {"self": self.model, "env": self.model.env, "rollout_buffer": self.model.rollout_buffer}
        snapshot = {}
        for name, value in self.locals.items():
            if name in objects:
                snapshot[name] = value is objects[name]
            elif name == "callback":
                snapshot[name] = type(value).__name__
            elif name == "infos":
                snapshot[name] = [without_wall_time(i) for i in value]
            else:
                snapshot[name] = self._copy(value)
        return snapshot

    def _on_rollout_start(self) -> None:
        self.events.append("start")
        self.rollout_steps = 0

    def _on_step(self) -> bool:
        self.steps.append(self._snapshot())
        self.rollout_steps += 1
        return self.stop_at is None or self.rollout_steps < self.stop_at

    def _on_rollout_end(self) -> None:
        self.events.append("end")
        self.steps.append({"end": True, **self._snapshot()})


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical, recursively (tensors, arrays, dicts, lists, scalars)."""
    if isinstance(a, tuple) and a and a[0] in ("tensor", "array"):
        assert a[:2] == b[:2], f"{where}: {a[:2]} vs {b[:2]}"
        equal = th.equal(a[2], b[2]) if a[0] == "tensor" else np.array_equal(a[2], b[2])
        assert equal, f"{where}: {a[2]} vs {b[2]}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        assert np.array_equal(a, b), f"{where}: {a} vs {b}"
    elif isinstance(a, th.Tensor):
        assert a.dtype == b.dtype, where
        assert th.equal(a, b), f"{where}: {a} vs {b}"
    elif isinstance(a, tuple) and a and a[0] == "scalar":
        assert a == b, f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a} vs {b}"


def collect(
    make_model: Any,
    fast: bool,
    n_rollouts: int = 3,
    stop_at: int | None = None,
    collector: Any = None,
    fields: tuple[str, ...] = BUFFER_FIELDS,
) -> dict[str, Any]:
    """Collect ``n_rollouts`` rollouts (no update in between) and return everything they leave behind.

    :param collector: ``(model, callback) -> bool`` collecting one rollout (default: the model's ``collect_rollouts``)
    :param fields: the buffer fields to compare besides the observations and masks
    """
    model = make_model(fast)
    model._setup_learn(10**6, None)
    recorder = RecordingCallback(stop_at)
    callback = model._init_callback(recorder)
    callback.on_training_start({}, {})  # the locals compared are the collection loop's alone
    buffers, continues = [], []
    for _ in range(n_rollouts):
        if collector is None:
            continues.append(model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps))
        else:
            continues.append(collector(model, callback))
        buffer = model.rollout_buffer
        observations = buffer.observations
        buffers.append(
            {
                "observations": {k: v.copy() for k, v in observations.items()}
                if isinstance(observations, dict)
                else observations.copy(),
                **{field: getattr(buffer, field).copy() for field in fields},
                **({"action_masks": buffer.action_masks.copy()} if hasattr(buffer, "action_masks") else {}),
                "pos": buffer.pos,
                "full": buffer.full,
            }
        )
    return {
        "buffers": buffers,
        "continues": continues,
        "callback": recorder.steps,
        "events": recorder.events,
        "torch_rng": th.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "last_obs": RecordingCallback._copy(model._last_obs),
        "last_episode_starts": model._last_episode_starts.copy(),
        "num_timesteps": model.num_timesteps,
        "episodes": [{k: v for k, v in e.items() if k != "t"} for e in model.ep_info_buffer],
        "gap": model._collection_gap,
        # a recurrent model's states left for the next rollout
        "last_states": [t.clone() for pair in getattr(model, "_last_lstm_states", ()) for t in pair],
    }


def assert_identical_collection(make_model: Any, n_rollouts: int = 3, stop_at: int | None = None) -> dict[str, Any]:
    fast, sb3 = collect(make_model, True, n_rollouts, stop_at), collect(make_model, False, n_rollouts, stop_at)
    assert fast.pop("gap") is None, "the lean loop should cover this configuration"
    sb3.pop("gap")
    for key in fast:
        assert_same(fast[key], sb3[key], key)
    return fast


def random_env_model(obs_space: spaces.Space, action_space: spaces.Space, **kwargs: Any) -> Any:
    def make(fast: bool) -> TRPO:
        # episodes of 7 steps end by truncation: the timeout bootstrap runs inside every rollout
        env = make_vec_env(lambda: RandomEnv(obs_space, action_space, ep_length=7), n_envs=2, seed=3)
        return TRPO("MlpPolicy", env, n_steps=16, batch_size=32, seed=1, fast_collection=fast, **kwargs)

    return make


@pytest.mark.parametrize("action_name", sorted(ACTION_SPACES))
@pytest.mark.parametrize("obs_name", sorted(OBSERVATION_SPACES))
def test_every_observation_and_action_space_collects_what_sb3_collects(obs_name, action_name):
    result = assert_identical_collection(random_env_model(OBSERVATION_SPACES[obs_name], ACTION_SPACES[action_name]))
    rewards = np.concatenate([b["rewards"] for b in result["buffers"]])
    assert len(result["callback"]) == 3 * 16 + 3
    assert result["events"] == ["start", "end"] * 3
    assert any(info.get("TimeLimit.truncated") for step in result["callback"] for info in step.get("infos", []))
    actions = np.concatenate([b["actions"] for b in result["buffers"]])
    assert len(np.unique(rewards)) > 3
    assert len(np.unique(actions)) > 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_sde": True},  # noise matrices sampled once per rollout
        {"use_sde": True, "sde_sample_freq": 3},  # and resampled every 3 steps
        {"use_sde": True, "policy_kwargs": {"full_std": False, "use_expln": True}},
        {"policy_kwargs": {"net_arch": {"pi": [8, 8, 8], "vf": [5]}, "activation_fn": th.nn.ReLU}},
        {"policy_kwargs": {"net_arch": [], "share_features_extractor": False}},
        {"policy_kwargs": {"activation_fn": th.nn.ELU, "share_features_extractor": False}},
    ],
    ids=["gsde", "gsde-resampled", "gsde-expln", "relu-deep", "no-hidden-layers", "elu-separate-extractors"],
)
def test_gsde_and_network_shapes_collect_what_sb3_collects(kwargs):
    assert_identical_collection(random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["box"], **kwargs))


def test_action_clipping_to_the_env_bounds_matches_sb3():
    bounded = spaces.Box(np.array([-0.1, 0.0], np.float32), np.array([0.1, 2.0], np.float32))
    result = assert_identical_collection(
        random_env_model(OBSERVATION_SPACES["box"], bounded, policy_kwargs={"log_std_init": 1.0})
    )
    steps = [s for s in result["callback"] if "clipped_actions" in s and "end" not in s]
    actions, clipped = (np.concatenate([s[name][2] for s in steps]) for name in ("actions", "clipped_actions"))
    assert (actions != clipped).mean() > 0.3
    assert clipped.min() >= -0.1
    assert clipped.max() <= 2.0


def test_cnn_and_multi_input_policies_collect_what_sb3_collects():
    image = spaces.Box(0, 255, shape=(36, 36, 1), dtype=np.uint8)

    def cnn(fast: bool) -> TRPO:
        env = make_vec_env(lambda: RandomEnv(image, spaces.Discrete(3), ep_length=5), n_envs=2, seed=0)
        return TRPO("CnnPolicy", env, n_steps=8, batch_size=16, seed=0, fast_collection=fast)

    assert_identical_collection(cnn, n_rollouts=2)

    dict_space = spaces.Dict({"image": image, "vector": spaces.Box(-1, 1, (3,)), "index": spaces.Discrete(3)})

    def multi_input(fast: bool) -> TRPO:
        env = make_vec_env(lambda: RandomEnv(dict_space, spaces.Box(-1, 1, (2,)), ep_length=5), n_envs=2, seed=0)
        return TRPO("MultiInputPolicy", env, n_steps=8, batch_size=16, seed=0, fast_collection=fast)

    assert_identical_collection(multi_input, n_rollouts=2)


def test_vec_normalize_and_episode_bookkeeping_match_sb3():
    def make(fast: bool) -> TRPO:
        env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0))
        return TRPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, fast_collection=fast)

    result = assert_identical_collection(make, n_rollouts=4)
    assert len(result["episodes"]) > 5  # CartPole's episodes ended and were recorded alike


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_environments_in_subprocesses_collect_what_sb3_collects(env_id):
    # `sb3-trpo train --vec-env subproc`: the lean loop steps a SubprocVecEnv as SB3's loop does
    made: list[VecNormalize] = []

    def make(fast: bool) -> TRPO:
        env = VecNormalize(make_vec_env(env_id, n_envs=2, seed=0, vec_env_cls=SubprocVecEnv))
        made.append(env)
        return TRPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, fast_collection=fast)

    try:
        result = assert_identical_collection(make, n_rollouts=4)
    finally:
        for env in made:
            env.close()
    assert len(result["episodes"]) > 0  # episodes ended (by termination or truncation) and were recorded alike


def test_a_callback_stopping_the_rollout_stops_both_loops_at_the_same_step():
    result = assert_identical_collection(random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["discrete"]), 2, stop_at=5)
    assert result["continues"] == [False, False]
    assert result["events"] == ["start", "start"]
    assert result["num_timesteps"] == 2 * 5 * 2


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_training_gives_bit_identical_parameters_with_and_without_the_lean_loop(env_id):
    def train(fast: bool) -> tuple[th.Tensor, list[float]]:
        env = make_vec_env(env_id, n_envs=2, seed=0)
        model = TRPO("MlpPolicy", env, n_steps=128, batch_size=64, seed=0, fast_collection=fast)
        model.learn(4 * 256)
        returns = [e["r"] for e in model.ep_info_buffer]
        return th.nn.utils.parameters_to_vector(model.policy.parameters()).detach(), returns

    (fast_params, fast_returns), (sb3_params, sb3_returns) = train(True), train(False)
    assert th.equal(fast_params, sb3_params)
    assert fast_returns == sb3_returns


def test_the_torch_path_for_other_devices_matches_sb3_too(monkeypatch):
    """On a GPU the samplers finish in torch instead of numpy: the same results (forced here on the CPU)."""
    original = LeanForward.__init__

    def torch_only(self: LeanForward, policy: ActorCriticPolicy) -> None:
        original(self, policy)
        self._on_cpu = False

    monkeypatch.setattr(LeanForward, "__init__", torch_only)
    for action_name in ("box", "discrete", "multidiscrete"):
        assert_identical_collection(random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES[action_name]), 2)


def test_multinomial_is_drawn_as_torch_draws_it():
    assert lean_forward._multinomial_is_exponential_race(th.device("cpu"))  # so the CPU path above used the race


def test_collection_when_torch_draws_multinomials_otherwise(monkeypatch):
    monkeypatch.setattr(lean_forward, "_multinomial_is_exponential_race", lambda device: False)
    assert_identical_collection(random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["multidiscrete"]), 2)


class OwnForwardPolicy(ActorCriticPolicy):
    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        return super().forward(obs, deterministic)


class OwnBuffer(RolloutBuffer):
    pass


def _small_model(env_id: str, policy: Any = "MlpPolicy", **kwargs: Any) -> Any:
    """:return: a function of ``fast_collection`` making a small seeded TRPO on ``env_id``"""
    return lambda fast: TRPO(
        policy, make_vec_env(env_id, 2, seed=0), n_steps=16, batch_size=32, seed=0, fast_collection=fast, **kwargs
    )


def _hooked(fast: bool) -> TRPO:
    model = random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["box"])(fast)
    model.policy.action_net.register_forward_hook(lambda module, inputs, output: output)
    return model


def _instance_forward(fast: bool) -> TRPO:
    """A policy whose forward is replaced on the instance, not the class."""
    model = random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["box"])(fast)
    forward = model.policy.forward
    model.policy.forward = lambda obs, deterministic=False: forward(obs, deterministic)
    return model


def _instance_layer_forward(fast: bool) -> TRPO:
    """A layer of the policy whose forward is replaced on the instance."""
    model = random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["box"])(fast)
    action_net = model.policy.action_net
    model.policy.action_net.forward = lambda x: th.nn.Linear.forward(action_net, x) * 0.5
    return model


@pytest.mark.parametrize(
    ("make_model", "reason"),
    [
        (_small_model("CartPole-v1", OwnForwardPolicy), "overrides forward"),
        (_instance_forward, "replaces forward on the instance"),
        (_instance_layer_forward, "replaces forward on the instance"),
        (_small_model("CartPole-v1", rollout_buffer_class=OwnBuffer), "rollout buffer class OwnBuffer"),
        (_hooked, "forward hooks"),
        (_small_model("Pendulum-v1", use_sde=True, policy_kwargs={"squash_output": True}), "squashed actions"),
    ],
    ids=["own-forward", "instance-forward", "instance-layer-forward", "own-buffer", "hooks", "squashed-gsde"],
)
def test_what_the_lean_loop_does_not_cover_falls_back_to_sb3(make_model, reason, monkeypatch):
    model = make_model(True)
    gap = lean_collection_gap(model.policy, model.rollout_buffer)
    assert gap is not None
    assert reason in gap

    def never(*args: Any) -> bool:
        raise AssertionError("the lean loop ran on a configuration it does not cover")

    monkeypatch.setattr("sb3_trpo.trpo.lean_collect_rollouts", never)
    model.learn(64)
    assert model._collection_gap == gap
    assert model.num_timesteps == 64


def test_fallback_is_reported_once_at_verbose_1(capsys):
    env = make_vec_env("CartPole-v1", 2, seed=0)
    TRPO(OwnForwardPolicy, env, n_steps=16, batch_size=32, seed=0, verbose=1).learn(96)
    assert capsys.readouterr().out.count("Collecting rollouts with SB3's loop") == 1


def test_fast_collection_false_always_uses_sb3s_loop(monkeypatch):
    monkeypatch.setattr("sb3_trpo.trpo.lean_collect_rollouts", lambda *args: pytest.fail("lean loop used"))
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", 2, seed=0), n_steps=16, batch_size=32, fast_collection=False)
    model.learn(64)
    assert model.num_timesteps == 64


def test_fast_collection_is_validated_and_survives_save_and_load(tmp_path):
    with pytest.raises(ValueError, match=r"fast_collection=1 is not allowed: fast_collection must be True or False"):
        TRPO("MlpPolicy", "CartPole-v1", fast_collection=1)
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, fast_collection=False)
    model.save(tmp_path / "model")
    assert TRPO.load(tmp_path / "model").fast_collection is False
    assert TRPO.load(tmp_path / "model", fast_collection=True).fast_collection is True


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_non_finite_observations_raise_the_same_error_before_the_env_steps_again(env_id):
    for fast in (True, False):
        env = DummyVecEnv([lambda: NaNAfter(gym.make(env_id), at=5)])
        model = TRPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, fast_collection=fast)
        with pytest.raises(ValueError, match="non-finite observations") as error:
            model.learn(16)
        assert type(error.value).__name__ == "NonFiniteRolloutError"
        assert model.num_timesteps == 5


class MoveLogStdThroughData(BaseCallback):
    """Changes log_std in place through ``.data`` every 5 steps: autograd's version counter does not see it."""

    def _on_step(self) -> bool:
        if self.n_calls % 5 == 0:
            self.model.policy.log_std.data.add_(0.25)
        return True


def test_log_std_changed_through_data_mid_rollout_is_sampled_as_sb3_samples_it():
    results = []
    for fast in (True, False):
        model = random_env_model(OBSERVATION_SPACES["box"], ACTION_SPACES["box"])(fast)
        model.learn(48, callback=MoveLogStdThroughData())
        assert model._collection_gap is None or not fast
        buffer = model.rollout_buffer
        results.append(
            (buffer.actions.copy(), buffer.log_probs.copy(), th.cat([p.detach().flatten() for p in model.policy.parameters()]))
        )
    (fast_actions, fast_log_probs, fast_params), (sb3_actions, sb3_log_probs, sb3_params) = results
    assert np.array_equal(fast_actions, sb3_actions)
    assert np.array_equal(fast_log_probs, sb3_log_probs)
    assert th.equal(fast_params, sb3_params)
