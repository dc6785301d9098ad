"""MaskableRecurrentTRPO: the masked Fisher product over padded sequences against the explicit Hessian, padding that
never counts (values and masks), the trust region over whole masked rollouts, never an invalid action, round trips,
the mask sources, and learning a task that needs both memory and masks."""

import copy
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from tests.helpers import BOX_OBS, NaNAfter, import_sb3_contrib

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from sb3_trpo import MaskableRecurrentTRPO, MaskableTRPO, RecurrentTRPO  # noqa: E402
from sb3_trpo.actor import ActorView  # noqa: E402
from sb3_trpo.distributed import Replica  # noqa: E402
from sb3_trpo.fisher import GatheredHeadFisherProduct, JacobianFisherProduct  # noqa: E402
from sb3_trpo.maskable_recurrent import (  # noqa: E402
    MaskableRecurrentActorCriticPolicy,
    MaskedRecurrentEvaluator,
    _head_slices,
)
from sb3_trpo.policy_step import StepSettings, trust_region_step  # noqa: E402
from sb3_trpo.recurrent import RecurrentEvaluator  # noqa: E402
from sb3_trpo.recurrent_policies import RECURRENT_LAYER_TYPES  # noqa: E402
from tests.test_maskable import (  # noqa: E402
    MASKED_SPACES,
    MaskedEnvWithObservations,
    random_masks,
    restricted_kl,
    sub_space_sizes,
)
from tests.test_masks import SOURCES, WithMethod  # noqa: E402
from tests.test_recurrent import EPISODE_STARTS, WEIGHTS  # noqa: E402

DAMPING = 0.1
SMALL = dict(lstm_hidden_size=8)


def tiny_policy(space: spaces.Space, seed: int = 0, cell: str = "lstm") -> MaskableRecurrentActorCriticPolicy:
    th.manual_seed(seed)
    policy = MaskableRecurrentActorCriticPolicy(
        BOX_OBS, space, lambda _: 1e-3, lstm_hidden_size=4, net_arch=dict(pi=[5], vf=[4]), recurrent_layer_type=cell
    )
    with th.no_grad():  # far from uniform, so the Fisher matrix is not degenerate
        for param in policy.action_net.parameters():
            param.normal_(0.0, 0.8)
    return policy.double()


def masked_sequences(policy: MaskableRecurrentActorCriticPolicy, space: spaces.Space, fully_masked: bool) -> dict:
    """Three sequences padded to 5 steps (lengths 5, 2, 4), an episode start inside the first, masks that change every
    step (with ``fully_masked``, every odd step has a sub-space with no valid action)."""
    generator = th.Generator().manual_seed(0)
    n = len(WEIGHTS)
    obs = th.rand(n, 3, generator=generator, dtype=th.float64) * 2 - 1
    episode_starts = th.zeros(n, dtype=th.float64)
    episode_starts[EPISODE_STARTS] = 1.0
    hidden = 0.5 * th.randn(2, 1, 3, 4, generator=generator, dtype=th.float64)
    context = ((hidden[0], hidden[1]), episode_starts)
    masks = random_masks(space, n, seed=1, fully_masked=fully_masked)
    with th.no_grad():
        actions = policy.get_distribution(obs, *context, action_masks=masks)[0].sample()
    weights = th.tensor(WEIGHTS, dtype=th.float64)
    return {"obs": obs, "actions": actions, "context": context, "masks": masks, "weights": weights}


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize("fully_masked", [False, True], ids=["valid-actions", "fully-masked-sub-spaces"])
@pytest.mark.parametrize("name", list(MASKED_SPACES))
def test_fisher_products_equal_the_explicit_hessian_of_the_masked_mean_kl_over_sequences(
    name, fully_masked, cell, float64_observations
):
    space = MASKED_SPACES[name]
    policy = tiny_policy(space, cell=cell)
    batch = masked_sequences(policy, space, fully_masked)
    obs, actions, context, masks, weights = (batch[k] for k in ("obs", "actions", "context", "masks", "weights"))
    actor = ActorView(policy, obs, context)
    assert any(p is policy.lstm_actor.weight_hh_l0 for p in actor.parameters), "the cell is an actor parameter"
    theta_old = actor.flat()
    sizes = sub_space_sizes(space)

    def raw_logits(theta: th.Tensor) -> th.Tensor:  # unmasked: the reference restricts them to the valid actions
        return th.cat(actor.evaluate(theta, obs, actions, context=context).params.tensors, dim=1)

    with th.no_grad():
        old_raw = raw_logits(theta_old)

    def masked_mean_kl(theta: th.Tensor) -> th.Tensor:  # over real steps only
        kl = restricted_kl(old_raw, raw_logits(theta), masks, sizes)
        return (kl * weights).sum() / weights.sum()

    hessian = th.autograd.functional.hessian(masked_mean_kl, theta_old)
    assert hessian.abs().max() > 1e-3, "degenerate test: the Hessian is (nearly) zero"
    theta = theta_old.clone().requires_grad_(True)
    evaluator = RecurrentEvaluator(actor, obs, actions, context, weights, DAMPING, masks)
    current = evaluator.evaluate(theta)
    product = evaluator.fisher_product(theta, current)
    unmasked = JacobianFisherProduct(
        theta, actor.evaluate(theta, obs, actions, context=context).params, DAMPING, weights=weights
    )
    generator = th.Generator().manual_seed(1)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator, dtype=th.float64)
        expected = hessian @ v + DAMPING * v
        th.testing.assert_close(product(v), expected, rtol=1e-7, atol=1e-9)
    assert not th.allclose(unmasked(v), expected, rtol=1e-3, atol=1e-5)  # the masks make another matrix


@pytest.mark.parametrize("net_arch", [dict(pi=[5], vf=[4]), dict(pi=[], vf=[4])], ids=["hidden-layer", "head-on-lstm"])
def test_few_valid_actions_among_many_use_the_gathered_head_over_sequences_and_equal_the_explicit_hessian(
    net_arch, float64_observations
):
    """40 actions with at most 8 valid in each real step (one with a single one, one with none) and every action
    valid in the padding: the product runs the head over the valid actions only, the LSTM through autograd, and is
    still the Hessian of the masked mean KL over the real steps."""
    th.manual_seed(0)
    policy = MaskableRecurrentActorCriticPolicy(
        BOX_OBS, spaces.Discrete(40), lambda _: 1e-3, lstm_hidden_size=4, net_arch=net_arch
    )
    with th.no_grad():
        for param in policy.action_net.parameters():
            param.normal_(0.0, 0.8)
    policy = policy.double()
    batch = masked_sequences(policy, spaces.Discrete(40), fully_masked=False)
    obs, context, weights = batch["obs"], batch["context"], batch["weights"]
    generator = np.random.default_rng(3)
    masks = np.ones((len(weights), 40), dtype=bool)  # the padding's masks: every action
    for i in np.flatnonzero(WEIGHTS):
        masks[i] = False
        masks[i, generator.choice(40, int(generator.integers(2, 9)), replace=False)] = True
    masks[1] = False
    masks[1, 7] = True  # a single valid action: a point mass
    masks[3] = False  # none: sb3-contrib's fixed uniform distribution
    masks = th.as_tensor(masks)
    with th.no_grad():
        actions = policy.get_distribution(obs, *context, action_masks=masks)[0].sample()
    actor = ActorView(policy, obs, context)
    theta_old = actor.flat()

    def raw_logits(theta: th.Tensor) -> th.Tensor:
        return actor.evaluate(theta, obs, actions, context=context).params.tensors[0]

    with th.no_grad():
        old_raw = raw_logits(theta_old)

    def masked_mean_kl(theta: th.Tensor) -> th.Tensor:
        kl = restricted_kl(old_raw, raw_logits(theta), masks, [40])
        return (kl * weights).sum() / weights.sum()

    hessian = th.autograd.functional.hessian(masked_mean_kl, theta_old)
    theta = theta_old.clone().requires_grad_(True)
    evaluator = MaskedRecurrentEvaluator(actor, obs, actions, context, weights, DAMPING, masks)
    product = evaluator.fisher_product(theta, evaluator.evaluate(theta))
    assert isinstance(product, GatheredHeadFisherProduct), "the head should run over the valid actions only"
    autograd = RecurrentEvaluator(actor, obs, actions, context, weights, DAMPING, masks)
    full = autograd.fisher_product(theta, autograd.evaluate(theta))
    generator_v = th.Generator().manual_seed(1)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator_v, dtype=th.float64)
        expected = hessian @ v + DAMPING * v
        th.testing.assert_close(product(v), expected, rtol=1e-7, atol=1e-9)
        th.testing.assert_close(product(v), full(v), rtol=1e-7, atol=1e-9)


def test_the_gathered_head_is_taken_only_where_it_applies(float64_observations):
    """Where more than a quarter of the actions are valid in some real step, or the action space is not Discrete, the
    product is autograd's over every logit."""
    space = spaces.Discrete(40)
    policy = MaskableRecurrentActorCriticPolicy(BOX_OBS, space, lambda _: 1e-3, lstm_hidden_size=4).double()
    batch = masked_sequences(policy, space, fully_masked=False)
    obs, actions, context, weights = batch["obs"], batch["actions"], batch["context"], batch["weights"]
    actor = ActorView(policy, obs, context)
    theta = actor.flat().requires_grad_(True)
    many = th.zeros(len(weights), 40, dtype=th.bool)
    many[:, :8] = True
    many[0, :11] = True  # 11 of 40 in one real step
    few = many.clone()
    few[0, 10] = few[0, 9] = few[0, 8] = False  # 10 of 40: a quarter
    kinds = {}
    for name, masks in (("many", many), ("few", few)):
        evaluator = MaskedRecurrentEvaluator(actor, obs, actions, context, weights, DAMPING, masks)
        kinds[name] = type(evaluator.fisher_product(theta, evaluator.evaluate(theta)))
    assert kinds == {"many": JacobianFisherProduct, "few": GatheredHeadFisherProduct}
    multi = MaskableRecurrentActorCriticPolicy(
        BOX_OBS, spaces.MultiDiscrete([20, 20]), lambda _: 1e-3, lstm_hidden_size=4
    ).double()
    assert _head_slices(ActorView(multi, obs, context)) is None


def _step(policy, batch, old_log_prob, advantages):
    actor = ActorView(policy, batch["obs"], batch["context"])
    evaluator = RecurrentEvaluator(
        actor, batch["obs"], batch["actions"], batch["context"], batch["weights"], DAMPING, batch["masks"]
    )
    settings = StepSettings(target_kl=0.01, cg_max_steps=10, line_search_shrinking_factor=0.5, line_search_max_iter=15)
    return trust_region_step(evaluator, old_log_prob, advantages, settings, Replica.alone()), actor.flat()


@pytest.mark.parametrize("padded_masks", ["all-valid", "none-valid", "random"])
@pytest.mark.parametrize("name", list(MASKED_SPACES))
def test_padded_rows_never_change_the_step_whatever_their_masks(name, padded_masks, float64_observations):
    space = MASKED_SPACES[name]
    steps = []
    for perturb in (False, True):
        policy = tiny_policy(space)
        batch = masked_sequences(policy, space, fully_masked=False)
        with th.no_grad():
            distribution = policy.get_distribution(batch["obs"], *batch["context"], action_masks=batch["masks"])[0]
            old_log_prob = distribution.log_prob(batch["actions"])
        advantages = th.linspace(-1.0, 1.0, len(WEIGHTS), dtype=th.float64)
        if perturb:  # whatever sits in the padding: observations, actions, masks, log-probabilities, advantages
            padded = batch["weights"] == 0
            batch["obs"][padded] = 5.0
            batch["actions"][padded] = batch["actions"][padded].flip(0)
            masks = batch["masks"].clone()
            fill = {"all-valid": True, "none-valid": False}
            masks[padded] = fill[padded_masks] if padded_masks in fill else random_masks(space, int(padded.sum()), 7)
            batch["masks"] = masks
            old_log_prob, advantages = old_log_prob.clone(), advantages.clone()
            old_log_prob[padded], advantages[padded] = -1000.0, 100.0
        steps.append(_step(policy, batch, old_log_prob, advantages))
    (first, theta_first), (second, theta_second) = steps
    assert first.accepted
    assert th.equal(theta_first, theta_second)
    assert first == second


def whole_rollout_logits(
    policy: MaskableRecurrentActorCriticPolicy, obs: th.Tensor, starts: th.Tensor, initial: Any
) -> th.Tensor:
    """The unmasked logits of every step of each environment's whole rollout (the LSTM run from the state stored
    before its first step, reset at episode starts), ``(n_envs * n_steps, size)``."""
    logits = []
    for e in range(obs.shape[1]):
        context = ((initial[0][:, e : e + 1].contiguous(), initial[1][:, e : e + 1].contiguous()), starts[:, e])
        with th.no_grad():
            distribution = policy.get_distribution(obs[:, e], *context)[0]
        parts = getattr(distribution, "distributions", None) or [distribution.distribution]
        logits.append(th.cat([part.logits for part in parts], dim=1))
    return th.cat(logits)


@pytest.mark.parametrize("name", ["discrete", "multidiscrete"])
def test_every_accepted_step_keeps_the_masked_kl_over_whole_rollouts_within_the_trust_region(name):
    """The KL of each update over the valid actions, recomputed with torch.distributions for every step of each
    environment's whole rollout (no sequences, no padding), with the masks stored at collection."""
    from sb3_contrib.common.envs import InvalidActionEnvMultiDiscrete

    make = WithMethod if name == "discrete" else (lambda: InvalidActionEnvMultiDiscrete(dims=[3, 4], n_invalid_actions=3))
    env = make_vec_env(make, n_envs=2, seed=0)
    model = MaskableRecurrentTRPO("MlpLstmPolicy", env, n_steps=32, batch_size=16, seed=0, target_kl=0.02, policy_kwargs=SMALL)
    model.learn(64)  # past the first update, so that the states stored at collection are not all zero
    buffer, policy = model.rollout_buffer, model.policy
    sizes = sub_space_sizes(model.action_space)
    accepted = 0
    for _ in range(3):
        _, callback = model._setup_learn(32, reset_num_timesteps=False)
        model.collect_rollouts(model.env, callback, buffer, model.n_steps)
        obs = th.as_tensor(buffer.observations.copy())  # (n_steps, n_envs, ...), before get() reorders them
        starts = th.as_tensor(buffer.episode_starts.copy())
        initial = (th.as_tensor(buffer.hidden_states_pi[0].copy()), th.as_tensor(buffer.cell_states_pi[0].copy()))
        masks = th.as_tensor(buffer.action_masks.copy()).bool().transpose(0, 1).reshape(-1, sum(sizes))
        assert not masks.all(), "degenerate test: no action masked"
        before = whole_rollout_logits(policy, obs, starts, initial)
        model.train()
        after = whole_rollout_logits(policy, obs, starts, initial)
        kl = restricted_kl(before, after, masks, sizes).mean().item()
        if model.logger.name_to_value["train/is_line_search_success"] == 1.0:
            accepted += 1
            assert 0.0 < kl <= 0.02 * (1 + 1e-3), kl
        else:
            assert kl == 0.0
    assert accepted > 0


class Recall(gym.Env):
    """A cue shown at the first step only (one of 4), then blank observations; at the last step the agent must name
    the cue among the legal answers. The legal answers (2 of 4, always including the cue) are in the mask, which the
    observation does not show: a memoryless policy cannot know the cue, and a maskless one picks illegal answers
    (ending the episode at -1). Memory and masks together score 1."""

    observation_space = spaces.Box(0.0, 1.0, (5,), np.float32)
    action_space = spaces.Discrete(4)
    DELAY = 4

    def __init__(self) -> None:
        self.cue, self.t, self.decoy = 0, 0, 1

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(4, dtype=bool)
        if self.t < self.DELAY:
            mask[0] = True  # "wait" (action 0) is the only legal move before the question
        else:
            mask[[self.cue, self.decoy]] = True
        return mask

    def _obs(self) -> np.ndarray:
        obs = np.zeros(5, dtype=np.float32)
        if self.t == 0:
            obs[self.cue] = 1.0
        obs[4] = float(self.t >= self.DELAY)  # the question is asked
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(4)), 0
        self.decoy = int((self.cue + 1 + self.np_random.integers(3)) % 4)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        legal = self.action_masks()[int(action)]
        if self.t < self.DELAY:
            self.t += 1
            return self._obs(), 0.0 if legal else -1.0, not legal, False, {}
        reward = 1.0 if int(action) == self.cue else (0.0 if legal else -1.0)
        return self._obs(), reward, True, False, {}


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
def test_never_an_invalid_action_in_collection_predict_and_evaluation(cell):
    from sb3_contrib.common.maskable.utils import get_action_masks

    from sb3_trpo.masks import evaluate_policy

    env = make_vec_env(Recall, n_envs=2, seed=0)
    net = dict(lstm_hidden_size=8, recurrent_layer_type=cell)
    model = MaskableRecurrentTRPO("MlpLstmPolicy", env, n_steps=64, batch_size=64, seed=0, policy_kwargs=net)
    model.learn(512)
    buffer = model.rollout_buffer  # flattened by the update: (n_envs * n_steps, ...)
    actions = buffer.actions.reshape(-1).astype(int)
    masks = buffer.action_masks.reshape(len(actions), 4)
    assert masks[np.arange(len(actions)), actions].all()
    assert (buffer.rewards >= 0).all()  # an invalid action scores -1
    obs, state, starts = env.reset(), None, np.ones(2, dtype=bool)
    for _ in range(20):
        masks = get_action_masks(env)
        action, state = model.predict(obs, state, starts, deterministic=False, action_masks=masks)
        assert masks[np.arange(2), action].all()
        obs, _, starts, _ = env.step(action)
    returns, _ = evaluate_policy(model, env, n_eval_episodes=10, return_episode_rewards=True)
    assert min(returns) >= 0.0


def test_evaluation_with_masks_carries_the_lstm_states():
    """sb3-contrib's masked evaluate_policy (2.9.2) keeps the states predict returns under another name, so a recurrent
    policy starts afresh at every step; sb3_trpo.masks.evaluate_policy hands them back."""
    from sb3_contrib.common.maskable.evaluation import evaluate_policy as sb3_contribs

    from sb3_trpo.masks import evaluate_policy

    env = make_vec_env(Recall, n_envs=2, seed=0)
    model = MaskableRecurrentTRPO("MlpLstmPolicy", env, n_steps=32, batch_size=64, seed=0, policy_kwargs=SMALL)
    predict = model.policy.predict
    given: list[Any] = []

    def spy(observation, state=None, episode_start=None, deterministic=False, action_masks=None):
        given.append(state)
        return predict(observation, state, episode_start, deterministic, action_masks=action_masks)

    model.policy.predict = spy  # type: ignore[method-assign]
    evaluate_policy(model, env, n_eval_episodes=4)
    assert given[0] is None
    assert all(state is not None for state in given[1:])
    given.clear()
    sb3_contribs(model, env, n_eval_episodes=4, use_masking=True)
    assert all(state is None for state in given), "sb3-contrib's evaluation passes the states now: say so in the docs"


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
def test_save_load_gives_identical_predictions_and_states(cell, tmp_path):
    env = make_vec_env(Recall, n_envs=2, seed=0)
    net = dict(lstm_hidden_size=8, recurrent_layer_type=cell)
    model = MaskableRecurrentTRPO("MlpLstmPolicy", env, n_steps=32, batch_size=64, seed=0, policy_kwargs=net)
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = MaskableRecurrentTRPO.load(tmp_path / "model", env=env)
    assert loaded.policy.lstm_actor.hidden_size == 8
    assert type(loaded.policy.lstm_actor) is type(model.policy.lstm_actor)
    obs, starts = env.reset(), np.ones(2, dtype=bool)
    states = (None, None)
    masks = np.array([[True, False, True, True], [False, True, True, False]])
    for _ in range(6):
        first = model.predict(obs, states[0], starts, deterministic=True, action_masks=masks)
        second = loaded.predict(obs, states[1], starts, deterministic=True, action_masks=masks)
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1][0], second[1][0])
        assert masks[np.arange(2), first[0]].all()
        states, starts = (first[1], second[1]), np.zeros(2, dtype=bool)
    loaded.learn(64)


def test_every_mask_source_gives_the_same_rollout():
    rollouts = {}
    for name, make in SOURCES.items():
        model = MaskableRecurrentTRPO(
            "MlpLstmPolicy", make(), n_steps=32, batch_size=64, seed=3, policy_kwargs=dict(lstm_hidden_size=4)
        )
        model.learn(64)
        rollouts[name] = {k: np.array(getattr(model.rollout_buffer, k)) for k in ("observations", "actions", "action_masks")}
    reference = rollouts.pop("each environment's action_masks()")
    for name, other in rollouts.items():
        for key, array in reference.items():
            np.testing.assert_array_equal(other[key], array, err_msg=f"{name}: {key}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy="MlpPolicy"), "MaskableRecurrentTRPO needs a maskable recurrent policy"),
        (dict(env="Pendulum-v1"), "does not support the action space Box"),
        (dict(sub_sampling_factor=2), "sub_sampling_factor=2 is not allowed with RecurrentTRPO"),
        (dict(target_kl=-1.0), "target_kl=-1.0 is not allowed"),
    ],
)
def test_what_a_user_passes_in_is_checked(kwargs, match):
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy

    policy = RecurrentActorCriticPolicy if kwargs.pop("policy", None) else "MlpLstmPolicy"
    env = kwargs.pop("env", None) or make_vec_env(WithMethod, n_envs=1)
    with pytest.raises(ValueError, match=match):
        MaskableRecurrentTRPO(policy, env, **kwargs)


@pytest.mark.parametrize(
    ("policy", "observation_space"),
    [
        ("CnnLstmPolicy", spaces.Box(0, 255, (36, 36, 1), np.uint8)),
        ("MultiInputLstmPolicy", spaces.Dict({"x": spaces.Box(-1.0, 1.0, (3,)), "k": spaces.Discrete(3)})),
    ],
)
def test_the_cnn_and_multi_input_aliases_train_with_masks(policy, observation_space):
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy

    env = make_vec_env(lambda: MaskedEnvWithObservations(observation_space), n_envs=2, seed=0)
    kwargs: dict[str, Any] = dict(lstm_hidden_size=8, net_arch=[8])
    if policy == "CnnLstmPolicy":
        kwargs["features_extractor_kwargs"] = dict(features_dim=16)
    model = MaskableRecurrentTRPO(policy, env, n_steps=16, batch_size=16, seed=0, policy_kwargs=kwargs)
    assert isinstance(model.policy, MaskableRecurrentTRPO.policy_aliases[policy])
    assert isinstance(model.policy, RecurrentActorCriticPolicy)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(64)  # the environment asserts that every action it receives is legal
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_logged_keys_are_trpos():
    def keys(model: Any) -> set[str]:
        model.learn(64)
        return {key for key in model.logger.name_to_value if key.startswith("train/")}

    kwargs: dict[str, Any] = dict(n_steps=32, batch_size=16, seed=0, policy_kwargs=SMALL)
    masked = keys(MaskableRecurrentTRPO("MlpLstmPolicy", make_vec_env(Recall, n_envs=2, seed=0), **kwargs))
    recurrent = keys(RecurrentTRPO("MlpLstmPolicy", make_vec_env(Recall, n_envs=2, seed=0), **kwargs))
    assert masked == recurrent
    assert {"train/kl_divergence_loss", "train/step_size", "train/is_line_search_success"} <= masked


def test_non_finite_observations_stop_training_with_the_model_unchanged():
    from sb3_trpo.trpo import NonFiniteRolloutError

    class MaskedNaNAfter(NaNAfter):
        def action_masks(self) -> np.ndarray:
            return self.env.unwrapped.action_masks()

    # the third step, inside the first episode (of 5 steps): not a terminal observation
    env = make_vec_env(lambda: MaskedNaNAfter(Recall(), at=3), n_envs=1, seed=0)
    model = MaskableRecurrentTRPO("MlpLstmPolicy", env, n_steps=16, batch_size=16, seed=0, policy_kwargs=SMALL)
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.raises(NonFiniteRolloutError, match="non-finite observations"):
        model.learn(32)
    assert all(th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


@pytest.mark.slow
def test_memory_and_masks_together_learn_what_neither_learns_alone():
    """Recall: the cue must be remembered over 4 blank steps and the answer chosen among the legal ones. Without memory
    the best is 1/2 (a legal guess); without masks, illegal moves while waiting or answering pay -1. Evaluated with
    the masks and the LSTM's states (sb3_trpo.masks.evaluate_policy), 100 episodes, deterministic."""
    from sb3_trpo.masks import evaluate_policy

    def final_return(algorithm: Any, policy: str) -> float:
        env = make_vec_env(Recall, n_envs=4, seed=0)
        kwargs = dict(net_arch=[32]) if policy == "MlpPolicy" else dict(net_arch=[32], lstm_hidden_size=32)
        model = algorithm(policy, env, n_steps=64, batch_size=256, seed=0, target_kl=0.05, policy_kwargs=kwargs)
        model.learn(30_000)
        masking = algorithm is not RecurrentTRPO
        mean, _ = evaluate_policy(model, copy.deepcopy(env), n_eval_episodes=100, use_masking=masking, deterministic=True)
        return float(mean)

    both = final_return(MaskableRecurrentTRPO, "MlpLstmPolicy")
    no_memory = final_return(MaskableTRPO, "MlpPolicy")
    no_masks = final_return(RecurrentTRPO, "MlpLstmPolicy")
    print(f"returns: memory and masks {both:.3f}, no memory {no_memory:.3f}, no masks {no_masks:.3f}")
    assert both > 0.9, both
    assert no_memory < 0.7, no_memory
    assert no_masks < 0.7, no_masks
