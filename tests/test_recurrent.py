"""RecurrentTRPO: the Fisher product over sequences against the explicit Hessian of the masked mean KL, padding that
never counts, the trust region measured over whole rollouts, round trips, and the checks of what a user passes in."""

import copy
import subprocess
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from tests.helpers import ACTION_SPACES, BOX_OBS, NaNAfter, RandomEnv, import_sb3_contrib

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402

from sb3_trpo import TRPO, RecurrentTRPO  # noqa: E402
from sb3_trpo.actor import ActorView  # noqa: E402
from sb3_trpo.distributed import Replica  # noqa: E402
from sb3_trpo.fisher import JacobianFisherProduct, kl_hessian_vector_product  # noqa: E402
from sb3_trpo.policy_step import StepSettings, trust_region_step  # noqa: E402
from sb3_trpo.recurrent import RecurrentEvaluator, fold_sequence_starts, without_cudnn  # noqa: E402
from sb3_trpo.recurrent_policies import RECURRENT_LAYER_TYPES, RecurrentCellActorCriticPolicy  # noqa: E402

DAMPING = 0.1
SPACES = {"discrete": spaces.Discrete(3), "box": spaces.Box(-1.0, 1.0, (2,), np.float32)}
#: three sequences padded to 5 steps: lengths 5, 2 and 4
WEIGHTS = [*[1, 1, 1, 1, 1], *[1, 1, 0, 0, 0], *[1, 1, 1, 1, 0]]
#: sequence starts, and an episode start inside the first sequence (its state is reset there, as in collection)
EPISODE_STARTS = [0, 3, 5, 10]


def tiny_recurrent_policy(space: spaces.Space, seed: int = 0, cell: str = "lstm") -> RecurrentActorCriticPolicy:
    th.manual_seed(seed)
    policy = RecurrentCellActorCriticPolicy(
        BOX_OBS, space, lambda _: 1e-3, lstm_hidden_size=4, net_arch=dict(pi=[5], vf=[4]), recurrent_layer_type=cell
    )
    with th.no_grad():  # far from uniform, so the Fisher matrix is not degenerate
        for param in policy.action_net.parameters():
            param.normal_(0.0, 0.8)
    return policy.double()


def sequence_batch(policy: RecurrentActorCriticPolicy, seed: int = 0) -> dict[str, Any]:
    generator = th.Generator().manual_seed(seed)
    n = len(WEIGHTS)
    obs = th.rand(n, 3, generator=generator, dtype=th.float64) * 2 - 1
    episode_starts = th.zeros(n, dtype=th.float64)
    episode_starts[EPISODE_STARTS] = 1.0
    hidden = 0.5 * th.randn(2, 1, 3, 4, generator=generator, dtype=th.float64)
    context = ((hidden[0], hidden[1]), episode_starts)
    with th.no_grad():
        actions = policy.get_distribution(obs, *context)[0].sample()
    return {"obs": obs, "actions": actions, "context": context, "weights": th.tensor(WEIGHTS, dtype=th.float64)}


def torch_distribution(params: Any) -> th.distributions.Distribution:
    """The distribution of every row, by torch.distributions (independent of sb3_trpo's KL code)."""
    if len(params.tensors) == 1:
        return th.distributions.Categorical(logits=params.tensors[0])
    return th.distributions.Independent(th.distributions.Normal(*params.tensors), 1)


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize("name", list(SPACES))
def test_fisher_products_over_sequences_equal_the_explicit_hessian_of_the_masked_mean_kl(name, cell, float64_observations):
    policy = tiny_recurrent_policy(SPACES[name], cell=cell)
    batch = sequence_batch(policy)
    obs, actions, context, weights = batch["obs"], batch["actions"], batch["context"], batch["weights"]
    actor = ActorView(policy, obs, context)
    assert any(p is policy.lstm_actor.weight_hh_l0 for p in actor.parameters), "the cell is an actor parameter"
    theta_old = actor.flat()
    with th.no_grad():
        old = torch_distribution(actor.evaluate(theta_old, obs, actions, context=context).params)

    def masked_mean_kl(theta: th.Tensor) -> th.Tensor:
        new = torch_distribution(actor.evaluate(theta, obs, actions, context=context).params)
        return (th.distributions.kl_divergence(old, new) * weights).sum() / weights.sum()

    hessian = th.autograd.functional.hessian(masked_mean_kl, theta_old)
    assert hessian.abs().max() > 1e-3, "degenerate test: the Hessian is (nearly) zero"
    theta = theta_old.clone().requires_grad_(True)
    current = actor.evaluate(theta, obs, actions, context=context)
    products = {
        "closed-form": JacobianFisherProduct(theta, current.params, damping=DAMPING, weights=weights),
        "double-backprop": kl_hessian_vector_product(masked_mean_kl, theta_old, damping=DAMPING),
        "evaluator": RecurrentEvaluator(actor, obs, actions, context, weights, DAMPING).fisher_product(theta, current),
    }
    # the unweighted mean counts the padding: another matrix, which the test tells apart
    unweighted = JacobianFisherProduct(theta, current.params, damping=DAMPING)
    generator = th.Generator().manual_seed(1)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator, dtype=th.float64)
        expected = hessian @ v + DAMPING * v
        for label, product in products.items():
            th.testing.assert_close(product(v), expected, rtol=1e-7, atol=1e-9, msg=lambda m, label=label: f"{label}: {m}")
        assert not th.allclose(unweighted(v), expected, rtol=1e-3, atol=1e-5)


def _step(policy: RecurrentActorCriticPolicy, batch: dict[str, Any], old_log_prob: th.Tensor, advantages: th.Tensor):
    actor = ActorView(policy, batch["obs"], batch["context"])
    evaluator = RecurrentEvaluator(actor, batch["obs"], batch["actions"], batch["context"], batch["weights"], DAMPING)
    settings = StepSettings(target_kl=0.01, cg_max_steps=10, line_search_shrinking_factor=0.5, line_search_max_iter=15)
    result = trust_region_step(evaluator, old_log_prob, advantages, settings, Replica.alone())
    return result, actor.flat()


@pytest.mark.parametrize("name", list(SPACES))
@pytest.mark.parametrize("padded_log_prob", [-7.0, -1000.0])  # -1000: exp(log π - (-1000)) overflows to inf
def test_padded_rows_never_change_the_step(name, padded_log_prob, float64_observations):
    steps = []
    for perturb in (False, True):
        policy = tiny_recurrent_policy(SPACES[name])
        batch = sequence_batch(policy)
        with th.no_grad():
            old_log_prob = policy.get_distribution(batch["obs"], *batch["context"])[0].log_prob(batch["actions"])
        advantages = th.linspace(-1.0, 1.0, len(WEIGHTS), dtype=th.float64)
        if perturb:  # whatever sits in the padding: observations, actions, old log-probabilities, advantages
            padded = batch["weights"] == 0
            batch["obs"][padded] = 5.0
            batch["actions"][padded] = batch["actions"][padded].flip(0) if name == "discrete" else 3.0
            old_log_prob, advantages = old_log_prob.clone(), advantages.clone()
            old_log_prob[padded], advantages[padded] = padded_log_prob, 100.0
        steps.append(_step(policy, batch, old_log_prob, advantages))
    (first, theta_first), (second, theta_second) = steps
    assert first.accepted
    assert th.equal(theta_first, theta_second)
    assert first == second


def test_a_padded_ratio_that_overflows_skips_no_update():
    """64-D Box actions with log_std_init=-2.5: the density at the padded action 0 is about e^101 (64 · (2.5 - ½ log 2π)
    nats), so exp(log π(0) - 0), the ratio of a row sb3-contrib pads with zeros, overflows float32 to inf."""
    env = RandomEnv(BOX_OBS, spaces.Box(-1.0, 1.0, (64,), np.float32), ep_length=7)
    model = RecurrentTRPO("MlpLstmPolicy", env, n_steps=64, batch_size=64, policy_kwargs=dict(log_std_init=-2.5), seed=0)
    before = th.nn.utils.parameters_to_vector(model.policy.parameters()).clone()
    model.learn(192)  # 3 updates; a skipped step would warn (an error under the test suite's filterwarnings)
    assert model._skipped_policy_steps == 0
    assert not th.equal(th.nn.utils.parameters_to_vector(model.policy.parameters()), before)
    batch = model._rollout_batch()  # the last rollout's sequences, as the update saw them
    assert batch.weights is not None
    actor = model._get_actor_view(batch)
    with th.no_grad():
        log_prob = actor.evaluate(actor.flat(), batch.observations, batch.actions, context=batch.context).log_prob
    padded = batch.weights == 0
    assert not th.isfinite(th.exp(log_prob[padded] - batch.old_log_prob[padded])).all(), "degenerate test: no overflow"


def test_without_cudnn_turns_cudnn_off_on_cuda_devices_only():
    with without_cudnn(th.device("cuda")):
        assert not th.backends.cudnn.enabled
    enabled = th.backends.cudnn.enabled
    with without_cudnn(th.device("cpu")):
        assert th.backends.cudnn.enabled == enabled


class ShortEpisodes(gym.Wrapper):
    """Episodes of 7 steps, so that rollouts hold episode starts and sequences of several lengths."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(gym.wrappers.TimeLimit(env, max_episode_steps=7))


def small_model(space: spaces.Space, **kwargs: Any) -> RecurrentTRPO:
    env = make_vec_env(lambda: RandomEnv(BOX_OBS, space, ep_length=7), n_envs=2, seed=0)
    kwargs.setdefault("policy_kwargs", dict(lstm_hidden_size=8, net_arch=[8]))
    return RecurrentTRPO("MlpLstmPolicy", env, n_steps=32, batch_size=16, seed=0, **kwargs)


def whole_rollout_distributions(
    policy: RecurrentActorCriticPolicy, obs: th.Tensor, starts: th.Tensor, initial: tuple[th.Tensor, th.Tensor]
) -> list[th.distributions.Distribution]:
    """The action distributions of each environment's whole rollout, the LSTM run from the state stored before its
    first step (reset at episode starts), by torch.distributions."""
    result = []
    for e in range(obs.shape[1]):
        context = ((initial[0][:, e : e + 1].contiguous(), initial[1][:, e : e + 1].contiguous()), starts[:, e])
        with th.no_grad():
            torch_dist = policy.get_distribution(obs[:, e], *context)[0].distribution
        is_normal = isinstance(torch_dist, th.distributions.Normal)
        result.append(th.distributions.Independent(torch_dist, 1) if is_normal else torch_dist)
    return result


@pytest.mark.parametrize("name", list(SPACES))
def test_every_accepted_step_keeps_the_kl_over_whole_rollouts_within_the_trust_region(name):
    """The KL of each update, recomputed with torch.distributions by running the LSTM over each environment's whole
    rollout from its stored initial state (no sequences, no padding), before and after the update."""
    model = small_model(SPACES[name], target_kl=0.02)
    model.learn(64)  # past the first update, so that the states stored at collection are not all zero
    buffer = model.rollout_buffer
    policy = model.policy
    accepted = 0
    for _ in range(3):
        _, callback = model._setup_learn(32, reset_num_timesteps=False)
        model.collect_rollouts(model.env, callback, buffer, model.n_steps)
        obs = th.as_tensor(buffer.observations.copy())  # (n_steps, n_envs, obs_dim), before get() reorders them
        starts = th.as_tensor(buffer.episode_starts.copy())
        initial = (th.as_tensor(buffer.hidden_states_pi[0].copy()), th.as_tensor(buffer.cell_states_pi[0].copy()))

        before = whole_rollout_distributions(policy, obs, starts, initial)
        model.train()
        after = whole_rollout_distributions(policy, obs, starts, initial)
        kl = th.cat([th.distributions.kl_divergence(b, a) for b, a in zip(before, after, strict=True)]).mean().item()
        logged = model.logger.name_to_value
        if logged["train/is_line_search_success"] == 1.0:
            accepted += 1
            assert kl <= 0.02 * (1 + 1e-3), kl
        else:
            assert kl == 0.0
    assert accepted > 0


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize("name", ["discrete", "box"])
def test_the_recurrent_loop_collects_what_recurrent_ppos_collects(name, cell):
    """Step for step: observations, actions, rewards (with truncations bootstrapped from the critic's state), values,
    log-probabilities, the LSTM states stored with each step, and the states and counters the rollout leaves."""
    from sb3_contrib import RecurrentPPO

    from sb3_trpo.recurrent import recurrent_collect_rollouts

    def fresh() -> RecurrentTRPO:
        # spaces of their own: RandomEnv samples its observations from them
        make = lambda: RandomEnv(copy.deepcopy(BOX_OBS), copy.deepcopy(SPACES[name]), ep_length=7)  # noqa: E731
        env = make_vec_env(make, n_envs=2, seed=0)
        net = dict(lstm_hidden_size=4, enable_critic_lstm=True, recurrent_layer_type=cell)
        kwargs = dict(n_steps=32, batch_size=64, seed=0, policy_kwargs=net)
        model = RecurrentTRPO("MlpLstmPolicy", env, **kwargs)
        model._setup_learn(64, None)
        return model

    ours, theirs = fresh(), fresh()
    for collect, model in ((recurrent_collect_rollouts, ours), (RecurrentPPO.collect_rollouts, theirs)):
        th.manual_seed(1)
        for _ in range(2):  # the second rollout starts from the states the first left
            assert collect(model, model.env, model._init_callback(None), model.rollout_buffer, 32)
    fields = ("observations", "actions", "rewards", "returns", "advantages", "values", "log_probs", "episode_starts")
    for field in (*fields, "hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf"):
        np.testing.assert_array_equal(getattr(ours.rollout_buffer, field), getattr(theirs.rollout_buffer, field), field)
    for a, b in zip(ours._last_lstm_states, theirs._last_lstm_states, strict=True):
        assert all(th.equal(x, y) for x, y in zip(a, b, strict=True))
    assert ours.num_timesteps == theirs.num_timesteps == 128
    assert ours.rollout_buffer.rewards.any()


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
def test_save_load_gives_identical_predictions_and_states_and_continues_training(cell, tmp_path):
    model = small_model(SPACES["box"], policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8], recurrent_layer_type=cell))
    model.learn(64)
    model.save(tmp_path / "model")
    loaded = RecurrentTRPO.load(tmp_path / "model", env=model.get_env())
    assert type(loaded.policy.lstm_actor) is type(model.policy.lstm_actor)
    obs = np.stack([BOX_OBS.sample() for _ in range(2)])
    state, starts = None, np.ones(2, dtype=bool)
    loaded_state = None
    for _ in range(4):
        action, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        loaded_action, loaded_state = loaded.predict(obs, state=loaded_state, episode_start=starts, deterministic=True)
        np.testing.assert_array_equal(action, loaded_action)
        for a, b in zip(state, loaded_state, strict=True):
            np.testing.assert_array_equal(a, b)
        starts = np.zeros(2, dtype=bool)
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == 64 + 64
    mean, _ = evaluate_policy(loaded, loaded.get_env(), n_eval_episodes=2)
    assert np.isfinite(mean)


def test_logged_keys_are_trpos():
    def keys(model: Any) -> set[str]:
        model.learn(64)
        return {key for key in model.logger.name_to_value if key.startswith("train/")}

    recurrent = keys(small_model(SPACES["box"]))
    plain = keys(
        TRPO("MlpPolicy", make_vec_env(lambda: RandomEnv(BOX_OBS, SPACES["box"]), n_envs=2), n_steps=32, batch_size=16)
    )
    assert recurrent == plain


def test_the_policy_step_runs_without_dropout_and_the_critic_step_with_it(monkeypatch):
    model = small_model(
        SPACES["discrete"], policy_kwargs=dict(lstm_hidden_size=8, n_lstm_layers=2, lstm_kwargs=dict(dropout=0.5))
    )
    seen = []
    evaluate = RecurrentEvaluator.evaluate
    monkeypatch.setattr(
        RecurrentEvaluator, "evaluate", lambda self, theta: seen.append(self.actor.policy.training) or evaluate(self, theta)
    )
    model.learn(64)
    assert seen
    assert not any(seen)
    assert model.policy.training  # back in training mode for the critic step
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0


def test_shared_lstm_is_in_the_trust_region_and_the_critic_step_leaves_it(monkeypatch):
    import sb3_trpo.solvers

    model = small_model(
        SPACES["box"], policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8], shared_lstm=True, enable_critic_lstm=False)
    )
    model.learn(32)
    assert any(p is model.policy.lstm_actor.weight_hh_l0 for p in model._actor_view.parameters)
    monkeypatch.setattr(sb3_trpo.solvers, "is_acceptable", lambda trial, max_kl: False)  # every policy step rejected
    before = model.policy.lstm_actor.weight_hh_l0.detach().clone()
    value_net = model.policy.value_net.weight.detach().clone()
    model.learn(32, reset_num_timesteps=False)
    assert th.equal(model.policy.lstm_actor.weight_hh_l0, before)
    assert not th.equal(model.policy.value_net.weight, value_net)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy="MlpPolicy"), "needs a recurrent policy"),
        (dict(sub_sampling_factor=2), "sub_sampling_factor=2 is not allowed"),
        (dict(distributed_critic="gather"), "distributed_critic='gather' is not allowed with RecurrentTRPO"),
        (dict(target_kl=-1.0), "target_kl=-1.0 is not allowed"),
    ],
)
def test_what_a_user_passes_in_is_checked(kwargs, match):
    from stable_baselines3.common.policies import ActorCriticPolicy

    policy = kwargs.pop("policy", "MlpLstmPolicy")
    with pytest.raises(ValueError, match=match):
        RecurrentTRPO(ActorCriticPolicy if policy == "MlpPolicy" else policy, "CartPole-v1", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sub_sampling_factor=2), "sub_sampling_factor=2 is not allowed with RecurrentTRPO"),
        (dict(distributed_critic="gather"), "distributed_critic='gather' is not allowed with RecurrentTRPO"),
    ],
)
def test_load_refuses_what_the_constructor_refuses(kwargs, match, tmp_path):
    # load()'s keywords override the saved settings: they would have been ignored (the step never sub-samples
    # sequences, and the recurrent critic step always all-reduces gradients)
    env = make_vec_env(lambda: RandomEnv(BOX_OBS, SPACES["discrete"], ep_length=7), n_envs=1, seed=0)
    RecurrentTRPO("MlpLstmPolicy", env, n_steps=16, batch_size=16, policy_kwargs=dict(lstm_hidden_size=4)).save(tmp_path / "m")
    with pytest.raises(ValueError, match=match):
        RecurrentTRPO.load(tmp_path / "m", env=env, **kwargs)


def test_import_sb3_trpo_needs_no_sb3_contrib_and_recurrent_trpo_says_how_to_install_it():
    code = (
        "import sys; sys.modules['sb3_contrib'] = None\n"
        "import sb3_trpo\n"
        "try:\n    sb3_trpo.RecurrentTRPO\nexcept ImportError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "sb3-trpo[recurrent]"' in out


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize("name", list(SPACES))
def test_folding_sequence_starts_into_the_initial_states_computes_the_same(name, cell, float64_observations):
    policy = tiny_recurrent_policy(SPACES[name], cell=cell)
    batch = sequence_batch(policy)
    (hidden, cell), starts = batch["context"]
    starts = starts.clone()
    starts[3] = 0.0  # starts at sequence starts only (sequences 0 and 1), as the buffer cuts them; sequence 2 goes on
    folded = fold_sequence_starts(((hidden, cell), starts))
    assert not folded[1].any(), "no start left: the LSTM runs over whole sequences in one call"
    with th.no_grad():
        expected = policy.get_distribution(batch["obs"], (hidden, cell), starts)[0].distribution
        got = policy.get_distribution(batch["obs"], *folded)[0].distribution
    for a, b in ((expected.logits, got.logits),) if name == "discrete" else ((expected.loc, got.loc),):
        th.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a start inside a sequence stays a start
    inside = starts.clone()
    inside[3] = 1.0
    assert fold_sequence_starts(((hidden, cell), inside))[1][3] == 1.0


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize("name", list(SPACES))
def test_the_step_over_sequences_is_the_step_of_the_equations(name, cell, float64_observations):
    """Against the TRPO step computed directly (Appendix C) on the same sequences in float64: ``g`` by autograd of the
    masked surrogate, ``F`` as the explicit Hessian of the masked mean KL, ``x`` by a direct solve, ``β`` and the
    first acceptable ``k``. CG runs until its residual test stops it here, so ``Δθ`` must be ``β · shrinkᵏ · x``."""
    policy = tiny_recurrent_policy(SPACES[name], cell=cell)
    batch = sequence_batch(policy)
    obs, actions, context, weights = batch["obs"], batch["actions"], batch["context"], batch["weights"]
    actor = ActorView(policy, obs, context)
    theta_old = actor.flat()
    with th.no_grad():
        old = actor.evaluate(theta_old, obs, actions, context=context)
    advantages = th.linspace(-1.0, 1.0, len(WEIGHTS), dtype=th.float64)
    delta, shrink = 0.01, 0.5

    def surrogate(theta: th.Tensor) -> th.Tensor:
        log_prob = actor.evaluate(theta, obs, actions, context=context).log_prob
        return (th.exp(log_prob - old.log_prob) * advantages * weights).sum() / weights.sum()

    old_dist = torch_distribution(old.params)

    def masked_mean_kl(theta: th.Tensor) -> th.Tensor:
        new = torch_distribution(actor.evaluate(theta, obs, actions, context=context).params)
        return (th.distributions.kl_divergence(old_dist, new) * weights).sum() / weights.sum()

    g = th.autograd.functional.jacobian(surrogate, theta_old)
    damped = th.autograd.functional.hessian(masked_mean_kl, theta_old) + DAMPING * th.eye(len(theta_old), dtype=th.float64)
    x = th.linalg.solve(damped, g)
    beta = float(th.sqrt(2 * delta / (x @ damped @ x)))
    k = next(
        k
        for k in range(15)
        if surrogate(theta_old + beta * shrink**k * x) > surrogate(theta_old)
        and masked_mean_kl(theta_old + beta * shrink**k * x) <= delta
    )
    evaluator = RecurrentEvaluator(actor, obs, actions, context, weights, DAMPING)
    settings = StepSettings(target_kl=delta, cg_max_steps=400, line_search_shrinking_factor=shrink, line_search_max_iter=15)
    result = trust_region_step(evaluator, old.log_prob, advantages, settings, Replica.alone())
    assert result.accepted
    assert result.line_search_steps == k
    expected = beta * shrink**k * x
    # CG stops at a squared residual of 1e-10, so the two agree to about 1e-5 of the step, not to float64 rounding
    assert float((actor.flat() - theta_old - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize(
    ("policy", "observation_space"),
    [
        ("CnnLstmPolicy", spaces.Box(0, 255, (36, 36, 1), np.uint8)),
        ("MultiInputLstmPolicy", spaces.Dict({"vector": BOX_OBS, "index": spaces.Discrete(3)})),
    ],
)
def test_the_cnn_and_multi_input_aliases_train(policy, observation_space):
    env = make_vec_env(lambda: RandomEnv(observation_space, SPACES["discrete"], ep_length=7), n_envs=2, seed=0)
    kwargs = dict(lstm_hidden_size=8, net_arch=[8])
    if policy == "CnnLstmPolicy":
        kwargs["features_extractor_kwargs"] = dict(features_dim=16)
    model = RecurrentTRPO(policy, env, n_steps=16, batch_size=16, seed=0, policy_kwargs=kwargs)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(64)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


@pytest.mark.parametrize("name", list(ACTION_SPACES))
def test_every_action_space_takes_accepted_steps(name):
    """MultiBinary included: sb3-contrib's recurrent buffer hands its actions out as int8, which Bernoulli's
    log-probability refuses (RecurrentPPO fails there)."""
    env = make_vec_env(lambda: RandomEnv(BOX_OBS, ACTION_SPACES[name], ep_length=7), n_envs=2, seed=0)
    model = RecurrentTRPO("MlpLstmPolicy", env, n_steps=16, batch_size=16, seed=0, policy_kwargs=dict(lstm_hidden_size=8))
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(64)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


@pytest.mark.parametrize(
    ("policy", "observation_space", "n_features"),
    [
        ("MlpLstmPolicy", spaces.MultiDiscrete([3, 4]), 3 + 4),  # one-hot per sub-space
        ("MultiInputLstmPolicy", spaces.Dict({"vector": BOX_OBS, "cells": spaces.MultiDiscrete([2, 5])}), 3 + 2 + 5),
    ],
)
def test_multi_discrete_observations_build_train_and_round_trip(policy, observation_space, n_features, tmp_path):
    """SB3 counts a MultiDiscrete observation's features as a numpy integer, which nn.LSTM refuses as its input size
    (RecurrentPPO cannot be built on it)."""
    env = make_vec_env(lambda: RandomEnv(observation_space, SPACES["discrete"], ep_length=7), n_envs=2, seed=0)
    model = RecurrentTRPO(policy, env, n_steps=16, batch_size=16, seed=0, policy_kwargs=dict(lstm_hidden_size=8))
    assert model.policy.lstm_actor.input_size == n_features
    # the policy keeps the extractor class it was given, as sb3-contrib's does
    assert model.policy.features_extractor_class is type(model.policy.features_extractor)
    model.learn(64)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    obs = env.reset()
    actions, states = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")
    loaded = RecurrentTRPO.load(tmp_path / "model", env=env)
    loaded_actions, loaded_states = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, loaded_actions)
    np.testing.assert_array_equal(states[0], loaded_states[0])
    loaded.learn(32)


def test_non_finite_observations_stop_training_with_the_model_unchanged():
    from sb3_trpo.trpo import NonFiniteRolloutError

    env = make_vec_env(lambda: NaNAfter(RandomEnv(BOX_OBS, SPACES["box"]), at=5), n_envs=1, seed=0)
    model = RecurrentTRPO("MlpLstmPolicy", env, n_steps=16, batch_size=16, seed=0, policy_kwargs=dict(lstm_hidden_size=8))
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.raises(NonFiniteRolloutError, match="non-finite observations"):
        model.learn(32)
    assert all(th.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_eval_callback_evaluates_with_the_lstm_state(tmp_path):
    from stable_baselines3.common.callbacks import EvalCallback

    model = small_model(SPACES["discrete"])
    eval_env = make_vec_env(lambda: RandomEnv(BOX_OBS, SPACES["discrete"], ep_length=7), n_envs=1, seed=5)
    callback = EvalCallback(
        eval_env, eval_freq=32, n_eval_episodes=2, best_model_save_path=str(tmp_path), log_path=str(tmp_path), verbose=0
    )
    model.learn(128, callback=callback)
    assert len(callback.evaluations_results) >= 2
    assert (tmp_path / "best_model.zip").is_file()
    RecurrentTRPO.load(tmp_path / "best_model.zip")
