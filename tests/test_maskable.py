"""MaskableTRPO: the masked Fisher product against the explicit Hessian of the masked KL, masks at collection and in
``predict``, the trust region on masked states, learning on sb3-contrib's invalid-action environments, round trips,
and the checks of what a user passes in."""

import subprocess
import sys
import warnings
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from tests.helpers import BOX_OBS, import_sb3_contrib
from tests.test_collection import assert_identical_collection

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_contrib.common.envs import (  # noqa: E402
    InvalidActionEnvDiscrete,
    InvalidActionEnvMultiBinary,
    InvalidActionEnvMultiDiscrete,
)
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback  # noqa: E402
from sb3_contrib.common.maskable.evaluation import evaluate_policy  # noqa: E402
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy  # noqa: E402
from sb3_contrib.common.maskable.utils import get_action_masks  # noqa: E402
from sb3_contrib.common.wrappers import ActionMasker  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from sb3_trpo import TRPO, MaskableTRPO  # noqa: E402
from sb3_trpo.actor import ActorView, mlp_fisher_product  # noqa: E402
from sb3_trpo.fisher import JacobianFisherProduct, kl_hessian_vector_product, mean_kl_from  # noqa: E402

DAMPING = 0.1
MASKED_SPACES = {
    "discrete": spaces.Discrete(5),
    "multidiscrete": spaces.MultiDiscrete([3, 4]),
    "multibinary": spaces.MultiBinary(3),
}


def sub_space_sizes(space: spaces.Space) -> list[int]:
    """The sizes of the categorical sub-spaces whose logits (and masks) are laid side by side."""
    if isinstance(space, spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, spaces.MultiDiscrete):
        return [int(n) for n in space.nvec]
    assert isinstance(space, spaces.MultiBinary)
    return [2] * int(space.n)


def random_masks(space: spaces.Space, n: int, seed: int = 0, fully_masked: bool = False) -> th.Tensor:
    """Masks that differ between states, at least one valid action per sub-space; state 0 keeps a single valid
    action per sub-space (its distribution is a point mass: KL 0, no curvature). With ``fully_masked``, every odd
    state has no valid action at all in its last sub-space (sb3-contrib then gives that sub-space the uniform
    distribution, whatever the parameters)."""
    generator = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        parts = []
        for size in sub_space_sizes(space):
            part = generator.random(size) < 0.6
            part[generator.integers(size)] = True
            if i == 0:
                part[:] = False
                part[generator.integers(size)] = True
            parts.append(part)
        if fully_masked and i % 2 == 1:
            parts[-1][:] = False
        rows.append(np.concatenate(parts))
    return th.as_tensor(np.stack(rows))


def tiny_maskable_policy(space: spaces.Space, seed: int = 0) -> MaskableActorCriticPolicy:
    th.manual_seed(seed)
    policy = MaskableActorCriticPolicy(BOX_OBS, space, lambda _: 1e-3, net_arch=dict(pi=[5], vf=[4]))
    with th.no_grad():  # far from uniform, so the Fisher matrix is not degenerate
        for param in policy.action_net.parameters():
            param.normal_(0.0, 0.8)
    return policy


def masked_batch(space: spaces.Space, n: int = 12, seed: int = 0, fully_masked: bool = False):
    policy = tiny_maskable_policy(space, seed)
    BOX_OBS.seed(seed)
    obs = th.as_tensor(np.stack([BOX_OBS.sample() for _ in range(n)]))
    masks = random_masks(space, n, seed, fully_masked)
    with th.no_grad():
        actions = policy.get_distribution(obs, action_masks=masks).sample()
    return policy, obs, actions, masks


def restricted_kl(old_logits: th.Tensor, new_logits: th.Tensor, masks: th.Tensor, sizes: list[int]) -> th.Tensor:
    """Per-state KL of the distributions restricted to the valid actions, by torch.distributions: independent of the
    -1e8 logits that sb3-contrib's masking uses (each state's categorical holds only its valid actions). A sub-space
    with no valid action has one fixed distribution (sb3-contrib's uniform one), whatever the parameters: KL 0."""
    kls = []
    for i in range(old_logits.shape[0]):
        total = old_logits.new_zeros(())
        for old, new, mask in zip(
            th.split(old_logits[i], sizes), th.split(new_logits[i], sizes), th.split(masks[i], sizes), strict=True
        ):
            if not mask.any():
                continue
            total = total + th.distributions.kl_divergence(
                th.distributions.Categorical(logits=old[mask]), th.distributions.Categorical(logits=new[mask])
            )
        kls.append(total)
    return th.stack(kls)


def raw_logits(actor: ActorView, theta: th.Tensor, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
    """The unmasked logits of every sub-space side by side (normalized per sub-space, which the KL ignores)."""
    return th.cat(actor.evaluate(theta, obs, actions).params.tensors, dim=1)


@pytest.mark.parametrize("fully_masked", [False, True], ids=["valid-actions", "fully-masked-sub-spaces"])
@pytest.mark.parametrize("name", list(MASKED_SPACES))
def test_masked_fisher_products_equal_the_explicit_hessian_of_the_masked_mean_kl(name, fully_masked):
    space = MASKED_SPACES[name]
    policy, obs, actions, masks = masked_batch(space, fully_masked=fully_masked)
    actor = ActorView(policy, obs)
    theta_old = actor.flat()
    sizes = sub_space_sizes(space)
    with th.no_grad():
        old_raw = raw_logits(actor, theta_old, obs, actions)
        old_masked = actor.evaluate(theta_old, obs, actions, masks).params

    def reference_mean_kl(theta: th.Tensor) -> th.Tensor:
        return restricted_kl(old_raw, raw_logits(actor, theta, obs, actions), masks, sizes).mean()

    hessian = th.autograd.functional.hessian(reference_mean_kl, theta_old)
    assert hessian.abs().max() > 1e-3, "degenerate test: the Hessian is (nearly) zero"
    theta = theta_old.clone().requires_grad_(True)
    implementations = {
        "closed-form": JacobianFisherProduct(theta, actor.evaluate(theta, obs, actions, masks).params, damping=DAMPING),
        "double-backprop": kl_hessian_vector_product(
            mean_kl_from(old_masked, lambda t: actor.evaluate(t, obs, actions, masks).params), theta_old, damping=DAMPING
        ),
    }
    written_out = mlp_fisher_product(actor, obs, DAMPING, masks)
    assert written_out is not None, "the maskable MLP actor is one the written-out product covers"
    implementations["written-out-mlp"] = written_out
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator)
        expected = hessian @ v + DAMPING * v
        for label, product in implementations.items():
            th.testing.assert_close(product(v), expected, rtol=1e-4, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}")
    # without the masks the metric is another one: the test can tell them apart
    unmasked = mlp_fisher_product(actor, obs, DAMPING)
    assert unmasked is not None
    v = th.randn(actor.size, generator=generator)
    assert not th.allclose(unmasked(v), hessian @ v + DAMPING * v, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("net_arch", [dict(pi=[5], vf=[4]), dict(pi=[], vf=[4])], ids=["hidden-layer", "head-only"])
def test_few_valid_actions_among_many_use_the_gathered_head_and_equal_the_explicit_hessian(net_arch):
    """40 actions with at most 8 valid per state (one state with a single one, one with none): the written-out product
    runs the head over the valid actions only, and is still the Hessian of the masked mean KL."""
    space = spaces.Discrete(40)
    th.manual_seed(0)
    policy = MaskableActorCriticPolicy(BOX_OBS, space, lambda _: 1e-3, net_arch=net_arch)
    with th.no_grad():
        for param in policy.action_net.parameters():
            param.normal_(0.0, 0.8)
    generator = np.random.default_rng(3)
    n = 12
    masks = np.zeros((n, 40), dtype=bool)
    for i in range(n):
        masks[i, generator.choice(40, int(generator.integers(2, 9)), replace=False)] = True
    masks[1] = False
    masks[1, 7] = True  # a single valid action: a point mass
    masks[2] = False  # none: sb3-contrib's fixed uniform distribution
    masks = th.as_tensor(masks)
    BOX_OBS.seed(0)
    obs = th.as_tensor(np.stack([BOX_OBS.sample() for _ in range(n)]))
    with th.no_grad():
        actions = policy.get_distribution(obs, action_masks=masks).sample()
    actor = ActorView(policy, obs)
    theta_old = actor.flat()
    with th.no_grad():
        old_raw = raw_logits(actor, theta_old, obs, actions)

    def reference_mean_kl(theta: th.Tensor) -> th.Tensor:
        return restricted_kl(old_raw, raw_logits(actor, theta, obs, actions), masks, [40]).mean()

    hessian = th.autograd.functional.hessian(reference_mean_kl, theta_old)
    written_out = mlp_fisher_product(actor, obs, DAMPING, masks)
    assert written_out is not None
    assert written_out._gathered is not None, "the product should run the head over the valid actions only"
    theta = theta_old.clone().requires_grad_(True)
    closed_form = JacobianFisherProduct(theta, actor.evaluate(theta, obs, actions, masks).params, damping=DAMPING)
    generator_v = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator_v)
        expected = hessian @ v + DAMPING * v
        th.testing.assert_close(written_out(v), expected, rtol=1e-4, atol=1e-5)
        th.testing.assert_close(written_out(v), closed_form(v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MASKED_SPACES))
def test_a_single_valid_action_gives_zero_kl_and_curvature_and_no_nan(name):
    space = MASKED_SPACES[name]
    policy, obs, _, _ = masked_batch(space)
    masks = random_masks(space, 1).expand(len(obs), -1)  # every state: one valid action per sub-space
    with th.no_grad():
        actions = policy.get_distribution(obs, action_masks=masks).sample()  # the valid ones
    actor = ActorView(policy, obs)
    theta = actor.flat().requires_grad_(True)
    current = actor.evaluate(theta, obs, actions, masks)
    assert all(bool(th.isfinite(t).all()) for t in current.params.tensors)
    with th.no_grad():
        moved = actor.evaluate(theta + 0.5, obs, actions, masks)
    from sb3_trpo.distributions import kl_divergence

    kl = kl_divergence(current.params.detach(), moved.params)
    assert bool(th.isfinite(kl).all())
    assert kl.abs().max() == 0.0
    (gradient,) = th.autograd.grad(current.log_prob.mean(), theta, retain_graph=True)
    assert bool(th.isfinite(gradient).all())
    assert gradient.abs().max() == 0.0
    v = th.randn(actor.size)
    for product in (
        JacobianFisherProduct(theta, current.params, damping=DAMPING),
        mlp_fisher_product(actor, obs, DAMPING, masks),
    ):
        assert product is not None
        th.testing.assert_close(product(v), DAMPING * v)


ENVS = {
    "discrete": lambda: InvalidActionEnvDiscrete(dim=20, n_invalid_actions=16),
    "multidiscrete": lambda: InvalidActionEnvMultiDiscrete(dims=[6, 6], n_invalid_actions=8),
    "multibinary": lambda: InvalidActionEnvMultiBinary(dims=6, n_invalid_actions=5),
}


def is_valid(space: spaces.Space, action: np.ndarray, mask: np.ndarray) -> bool:
    """Whether ``action`` (of one environment) picks only actions that ``mask`` allows."""
    offsets = np.cumsum([0, *sub_space_sizes(space)])[:-1]
    indices = offsets + np.asarray(action).reshape(-1).astype(int)
    return bool(np.asarray(mask, dtype=bool).reshape(-1)[indices].all())


class CheckCollectedActions(BaseCallback):
    """Fails if an action collected for training is not allowed by the mask it was collected with."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def _on_step(self) -> bool:
        actions, masks = self.locals["actions"], self.locals["action_masks"]
        space = self.model.action_space
        for action, mask in zip(actions, masks, strict=True):
            assert is_valid(space, action, mask), f"an invalid action {action} was collected (mask {mask})"
            self.checked += 1
        return True


@pytest.mark.parametrize("name", list(ENVS))
def test_invalid_actions_are_never_collected_or_predicted(name):
    env = make_vec_env(ENVS[name], n_envs=2, seed=0)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0)
    callback = CheckCollectedActions()
    model.learn(256, callback=callback)
    assert callback.checked == 256
    obs = env.reset()
    for _ in range(50):
        masks = get_action_masks(env)
        for deterministic in (False, True):
            actions, _ = model.predict(obs, deterministic=deterministic, action_masks=masks)
            assert all(is_valid(env.action_space, a, m) for a, m in zip(actions, masks, strict=True))
        obs, *_ = env.step(actions)


#: few valid actions per state among many (4 of 30; 3 of 8 per sub-space on average; 7 of 12 halves), and a budget
#: at which masks make the difference (measured here: MaskableTRPO 100, 100, 100 against TRPO 52, 83, 85.8)
LEARNING = {
    "discrete": (lambda: InvalidActionEnvDiscrete(dim=30, n_invalid_actions=26), 6_144),
    "multidiscrete": (lambda: InvalidActionEnvMultiDiscrete(dims=[8, 8], n_invalid_actions=10), 10_240),
    "multibinary": (lambda: InvalidActionEnvMultiBinary(dims=6, n_invalid_actions=5), 10_240),
}


@pytest.mark.parametrize("name", list(LEARNING))
def test_masked_trpo_reaches_the_optimal_return_and_beats_trpo_without_masks(name):
    make_env, budget = LEARNING[name]
    kwargs = dict(n_steps=256, batch_size=128, seed=0)
    masked = MaskableTRPO("MlpPolicy", make_vec_env(make_env, n_envs=2, seed=0), **kwargs).learn(budget)
    unmasked = TRPO("MlpPolicy", make_vec_env(make_env, n_envs=2, seed=0), **kwargs).learn(budget)
    eval_env = make_vec_env(make_env, n_envs=1, seed=1)
    masked_return, _ = evaluate_policy(masked, eval_env, n_eval_episodes=5, deterministic=True)
    # TRPO knows nothing of masks; sb3-contrib's evaluate_policy would hand them to its predict (use_masking=False)
    unmasked_return, _ = evaluate_policy(unmasked, eval_env, n_eval_episodes=5, deterministic=True, use_masking=False)
    # the optimum is 100 (a reward per step, 100 steps): at most 1% of the 500 evaluated steps wrong
    assert masked_return >= 99.0
    assert unmasked_return < masked_return - 10


def masked_states_kl(model: MaskableTRPO, old_policy_state: dict, obs: th.Tensor, masks: th.Tensor) -> th.Tensor:
    """Mean KL(old || new) over the valid actions of the rollout's states, by torch.distributions."""
    sizes = sub_space_sizes(model.action_space)
    policy = model.policy
    with th.no_grad():
        new_logits = th.cat([d.logits for d in _categoricals(policy, obs)], dim=1)
        current = {k: v.clone() for k, v in policy.state_dict().items()}
        policy.load_state_dict(old_policy_state)
        old_logits = th.cat([d.logits for d in _categoricals(policy, obs)], dim=1)
        policy.load_state_dict(current)
    return restricted_kl(old_logits, new_logits, masks, sizes).mean()


def _categoricals(policy: MaskableActorCriticPolicy, obs: th.Tensor) -> list[th.distributions.Categorical]:
    distribution = policy.get_distribution(obs)  # unmasked: restricted_kl applies the masks
    return [distribution.distribution] if hasattr(distribution, "distribution") else list(distribution.distributions)


@pytest.mark.parametrize("name", list(ENVS))
def test_every_accepted_step_keeps_the_masked_kl_within_the_trust_region(name):
    model = MaskableTRPO("MlpPolicy", make_vec_env(ENVS[name], n_envs=2, seed=0), n_steps=128, batch_size=128, seed=0)
    model.learn(256)  # a rollout in the buffer, and a set-up model
    accepted = 0
    for _ in range(4):
        model.learn(256, reset_num_timesteps=False)  # collects a fresh rollout, then updates
        data = next(model.rollout_buffer.get(batch_size=None))  # the rollout as the update sees it
        obs, masks = data.observations, data.action_masks.bool()
        old_state = {k: v.clone() for k, v in model.policy.state_dict().items()}
        model.train()
        kl = masked_states_kl(model, old_state, obs, masks).item()
        if model.logger.name_to_value["train/is_line_search_success"]:
            accepted += 1
            assert 0.0 < kl <= model.target_kl * (1 + 1e-4)
            assert kl == pytest.approx(model.logger.name_to_value["train/kl_divergence_loss"], rel=1e-3, abs=1e-7)
        assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())
    assert accepted >= 2


def test_the_update_uses_the_stored_masks():
    """The same rollout updated with and without its masks gives different policies: the masks reach the update."""
    env = make_vec_env(ENVS["discrete"], n_envs=2, seed=0)
    model = MaskableTRPO("MlpPolicy", env, n_steps=128, batch_size=128, seed=0)
    model.learn(256)
    start = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.train()
    with_masks = th.cat([p.detach().flatten().clone() for p in model.policy.parameters()])
    model.policy.load_state_dict(start)
    model._use_masking = False
    model.train()
    without_masks = th.cat([p.detach().flatten() for p in model.policy.parameters()])
    assert not th.allclose(with_masks, without_masks)


def test_logged_keys_are_trpos():
    masked = MaskableTRPO("MlpPolicy", make_vec_env(ENVS["discrete"], n_envs=2, seed=0), n_steps=64, batch_size=64, seed=0)
    plain = TRPO("MlpPolicy", make_vec_env(ENVS["discrete"], n_envs=2, seed=0), n_steps=64, batch_size=64, seed=0)
    masked.learn(128)
    plain.learn(128)
    assert set(masked.logger.name_to_value) == set(plain.logger.name_to_value)


def test_save_load_round_trip_gives_identical_predictions_and_continues_training(tmp_path):
    env = make_vec_env(ENVS["multidiscrete"], n_envs=2, seed=0)
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, target_kl=0.02)
    model.learn(256)
    model.save(tmp_path / "model")
    loaded = MaskableTRPO.load(tmp_path / "model", env=env)
    assert isinstance(loaded.policy, MaskableActorCriticPolicy)
    assert loaded.target_kl == 0.02
    obs = env.reset()
    masks = get_action_masks(env)
    for deterministic in (True, False):
        th.manual_seed(3)
        expected, _ = model.predict(obs, deterministic=deterministic, action_masks=masks)
        th.manual_seed(3)
        actual, _ = loaded.predict(obs, deterministic=deterministic, action_masks=masks)
        np.testing.assert_array_equal(actual, expected)
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 384


def test_maskable_eval_callback_and_action_masker_wrapper(tmp_path):
    def mask_fn(env):
        return env.unwrapped.action_masks()

    def make():
        return ActionMasker(InvalidActionEnvDiscrete(dim=8, n_invalid_actions=5), mask_fn)

    eval_callback = MaskableEvalCallback(
        make_vec_env(make, n_envs=1, seed=1), eval_freq=128, n_eval_episodes=2, log_path=str(tmp_path), verbose=0
    )
    model = MaskableTRPO("MlpPolicy", make_vec_env(make, n_envs=2, seed=0), n_steps=64, batch_size=64, seed=0)
    model.learn(512, callback=eval_callback)
    assert eval_callback.evaluations_timesteps == [256, 512]
    # evaluated with masks: far above the 100 / 3 of a uniform choice among the 3 valid actions
    assert eval_callback.last_mean_reward > 80


def test_learning_without_masks_needs_no_action_masks_method():
    from stable_baselines3.common.envs import IdentityEnv

    model = MaskableTRPO("MlpPolicy", IdentityEnv(dim=4), n_steps=64, batch_size=64, seed=0)
    with pytest.raises(ValueError, match=r"No action masks for environment\(s\) \[0\].*ActionMasker.*use_masking=False"):
        model.learn(64)
    model.learn(128, use_masking=False)
    assert model.num_timesteps == 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy=TRPO.policy_aliases["MlpPolicy"]), "maskable policy"),
        (dict(rollout_buffer_class=__import__("stable_baselines3").common.buffers.RolloutBuffer), "cannot store action masks"),
        (dict(target_kl=-1.0), "target_kl"),
        (dict(cg_max_steps=0), "cg_max_steps"),
    ],
)
def test_what_a_user_passes_in_is_checked(kwargs, match):
    arguments = dict(policy="MlpPolicy", env=InvalidActionEnvDiscrete(dim=4, n_invalid_actions=1), n_steps=64, batch_size=64)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MaskableTRPO(**arguments)


def test_box_actions_and_bad_use_masking_are_refused():
    from stable_baselines3.common.envs import IdentityEnvBox

    with pytest.raises(ValueError, match="masks exist for Discrete, MultiDiscrete and MultiBinary"):
        MaskableTRPO("MlpPolicy", IdentityEnvBox())
    model = MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=4, n_invalid_actions=1), n_steps=64, batch_size=64)
    with pytest.raises(ValueError, match="use_masking='yes': allowed values are True or False"):
        model.learn(64, use_masking="yes")


def test_import_sb3_trpo_needs_no_sb3_contrib_and_masked_trpo_says_how_to_install_it():
    script = """
import sys
sys.modules["sb3_contrib"] = None  # as if it were not installed
import sb3_trpo
from sb3_trpo import TRPO
TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64).learn(64)
try:
    from sb3_trpo import MaskableTRPO
except ImportError as error:
    print("ImportError:", error)
"""
    with warnings.catch_warnings():
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'pip install "sb3-trpo[masking]"' in result.stdout


class MaskedEnvTurningNan(gymnasium.Env):
    """Box observations that become NaN after a few steps, Discrete actions with a mask."""

    observation_space = spaces.Box(-1.0, 1.0, (3,))
    action_space = spaces.Discrete(4)

    def __init__(self) -> None:
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, dtype=np.float32), {}

    def step(self, action):
        self.steps += 1
        obs = np.full(3, np.nan if self.steps > 40 else 0.5, dtype=np.float32)
        return obs, 1.0, False, False, {}

    def action_masks(self) -> list[bool]:
        return [True, True, False, True]


def test_non_finite_observations_stop_training_with_the_model_unchanged():
    model = MaskableTRPO("MlpPolicy", MaskedEnvTurningNan(), n_steps=32, batch_size=32, seed=0)
    model.learn(32)
    before = th.cat([p.detach().flatten().clone() for p in model.policy.parameters()])
    with pytest.raises(ValueError, match="non-finite observations"):
        model.learn(64, reset_num_timesteps=False)
    assert th.equal(th.cat([p.detach().flatten() for p in model.policy.parameters()]), before)


def test_the_fast_update_paths_cover_the_maskable_policy_and_agree_with_the_general_ones(monkeypatch):
    import sb3_trpo.policy_step
    import sb3_trpo.trpo

    env = make_vec_env(ENVS["multidiscrete"], n_envs=2, seed=0)
    model = MaskableTRPO("MlpPolicy", env, n_steps=128, batch_size=64, seed=0)
    model.learn(256)
    start = {k: v.clone() for k, v in model.policy.state_dict().items()}
    optimizer_start = __import__("copy").deepcopy(model.policy.optimizer.state_dict())
    rng_states = np.random.get_state(), th.get_rng_state()  # the buffer's shuffle and the critic's minibatches
    used = []
    fisher, regression = sb3_trpo.policy_step.mlp_fisher_product, sb3_trpo.trpo.MlpCriticRegression.for_policy
    monkeypatch.setattr(sb3_trpo.policy_step, "mlp_fisher_product", lambda *a: used.append(fisher(*a)) or used[-1])
    monkeypatch.setattr(sb3_trpo.trpo.MlpCriticRegression, "for_policy", lambda *a: used.append(regression(*a)) or used[-1])
    model.train()
    assert len(used) == 2
    assert all(path is not None for path in used), "the written-out Fisher product and critic step apply"
    fast = th.cat([p.detach().flatten().clone() for p in model.policy.parameters()])
    model.policy.load_state_dict(start)
    model.policy.optimizer.load_state_dict(optimizer_start)
    np.random.set_state(rng_states[0])
    th.set_rng_state(rng_states[1])
    monkeypatch.setattr(sb3_trpo.policy_step, "mlp_fisher_product", lambda *a: None)
    monkeypatch.setattr(sb3_trpo.trpo.MlpCriticRegression, "for_policy", lambda *a: None)
    model.train()
    general = th.cat([p.detach().flatten() for p in model.policy.parameters()])
    th.testing.assert_close(fast, general, rtol=1e-4, atol=1e-5)


def maskable_model(make_env: Any, use_masking: bool = True, **kwargs: Any) -> Any:
    def make(fast: bool) -> MaskableTRPO:
        env = make_vec_env(make_env, n_envs=2, seed=3)
        model = MaskableTRPO("MlpPolicy", env, n_steps=16, batch_size=32, seed=1, fast_collection=fast, **kwargs)
        model._use_masking = use_masking  # as learn(use_masking=...) sets it
        return model

    return make


def short_episodes(make_env: Any) -> Any:
    # episodes of 7 steps, ended by truncation: the timeout bootstrap runs inside every rollout
    return lambda: gymnasium.wrappers.TimeLimit(make_env(), max_episode_steps=7)


@pytest.mark.parametrize("name", list(ENVS))
@pytest.mark.parametrize("use_masking", [True, False])
def test_the_lean_loop_collects_what_sb3_contribs_masked_loop_collects(name, use_masking):
    """Buffer fields and masks, random generator states, callback locals: bit-identical to MaskablePPO's loop."""
    assert_identical_collection(maskable_model(short_episodes(ENVS[name]), use_masking))


def test_the_lean_loop_covers_action_masker_and_stops_where_a_callback_stops_it():
    def make_env():
        return ActionMasker(InvalidActionEnvDiscrete(dim=8, n_invalid_actions=5), lambda env: env.unwrapped.action_masks())

    assert_identical_collection(maskable_model(make_env), stop_at=5)


def test_training_gives_bit_identical_parameters_with_and_without_the_lean_masked_loop():
    parameters = []
    for fast in (True, False):
        model = maskable_model(ENVS["multidiscrete"])(fast)
        model.learn(16 * 2 * 4)
        parameters.append(th.cat([p.detach().flatten() for p in model.policy.parameters()]))
    assert th.equal(*parameters)


def test_a_custom_maskable_policy_falls_back_to_sb3_contribs_loop(monkeypatch):
    class OwnForward(MaskableActorCriticPolicy):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs)

    model = MaskableTRPO(OwnForward, make_vec_env(ENVS["discrete"], n_envs=2, seed=0), n_steps=16, batch_size=32, seed=0)
    model.learn(32)
    assert model._collection_gap == "the policy class OwnForward overrides forward"


def test_use_sde_is_refused():
    # SB3 refuses it for discrete actions, before the policy exists
    with pytest.raises(ValueError, match=r"gSDE.*can only be used with continuous actions"):
        MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=4, n_invalid_actions=1), use_sde=True)


class MaskedEnvWithObservations(gymnasium.Env):
    """Any observation space, Discrete(4) actions of which a varying half are legal."""

    action_space = spaces.Discrete(4)

    def __init__(self, observation_space: spaces.Space) -> None:
        self.observation_space = observation_space
        self._legal = np.array([True, False, True, False])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        assert self._legal[action], f"illegal action {action}"
        self._legal = ~self._legal
        return self.observation_space.sample(), float(action), False, self.np_random.random() < 0.1, {}

    def action_masks(self) -> np.ndarray:
        return self._legal.copy()


@pytest.mark.parametrize(
    ("policy", "observation_space"),
    [
        ("CnnPolicy", spaces.Box(0, 255, (36, 36, 3), np.uint8)),
        ("MultiInputPolicy", spaces.Dict({"x": spaces.Box(-1.0, 1.0, (3,)), "k": spaces.Discrete(3)})),
    ],
)
def test_the_cnn_and_multi_input_aliases_train_with_masks(policy, observation_space):
    env = make_vec_env(lambda: MaskedEnvWithObservations(observation_space), n_envs=2, seed=0)
    model = MaskableTRPO(policy, env, n_steps=32, batch_size=32, seed=0)
    assert isinstance(model.policy, MaskableTRPO.policy_aliases[policy])
    model.learn(128)  # the env asserts that every action it receives is legal
    assert model._collection_gap is None, "the lean masked collection covers these policies"
    assert model.logger.name_to_value["train/is_line_search_success"] in (0.0, 1.0)
