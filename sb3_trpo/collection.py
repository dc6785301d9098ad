"""Rollout collection: a lean ``collect_rollouts`` that fills SB3's buffers with exactly what SB3's loop would,
and what TRPO checks and shares around collection (non-finite data, VecNormalize's running statistics).

SB3's loop spends most of a step on the policy's forward pass (module calls, a validated ``torch.distributions``
object) and on copying buffer fields twice; none of that changes what is collected.
"""

import functools
import math
from collections.abc import Callable

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize
from torch import nn
from torch.nn import functional as F


class NonFiniteRolloutError(ValueError):
    """The rollout holds NaN or infinite values, so no update can be computed from it."""


def non_finite_rollout_error(what: str, count: int) -> NonFiniteRolloutError:
    """:return: the error for ``count`` non-finite values of ``what`` in the rollout, saying how to find them"""
    return NonFiniteRolloutError(
        f"The rollout contains non-finite {what} ({count} NaN or infinite values), so no update was made: the "
        "model is unchanged and can still be saved. Wrap the environment in "
        "stable_baselines3.common.vec_env.VecCheckNan(env, raise_exception=True) to find the step that produces "
        "them (or in VecNormalize to tame very large rewards or observations)."
    )


def count_non_finite(values: np.ndarray | th.Tensor) -> int:
    """:return: the number of NaN or infinite entries (0 for integer arrays)"""
    if isinstance(values, th.Tensor):
        return 0 if not values.is_floating_point() else int((~th.isfinite(values)).sum())
    return 0 if not np.issubdtype(values.dtype, np.floating) else int((~np.isfinite(values)).sum())


def non_finite_counts(buffer: RolloutBuffer) -> dict[str, int]:
    """:return: how many NaN or infinite values each part of a filled rollout buffer holds"""
    observations = buffer.observations.values() if isinstance(buffer.observations, dict) else [buffer.observations]
    return {
        "observations": sum(count_non_finite(o) for o in observations),
        "rewards": count_non_finite(buffer.rewards),
        "value predictions": count_non_finite(buffer.values),
        "advantages or returns (computed from rewards and values)": count_non_finite(buffer.advantages)
        + count_non_finite(buffer.returns),
    }


def vec_normalize_running_stats(env: VecEnv | None) -> list[RunningMeanStd]:
    """VecNormalize's running statistics (observations, sorted by key for Dict spaces, then returns), if ``env``
    is normalized and training; otherwise none."""
    vec_normalize = unwrap_vec_normalize(env) if env is not None else None
    if vec_normalize is None or not vec_normalize.training:
        return []
    obs_rms = getattr(vec_normalize, "obs_rms", None)  # absent with norm_obs=False
    obs_stats = [] if obs_rms is None else [obs_rms[k] for k in sorted(obs_rms)] if isinstance(obs_rms, dict) else [obs_rms]
    return [*obs_stats, vec_normalize.ret_rms]


# ---------------------------------------------------------------------------------------------------------------
# The lean collection loop
# ---------------------------------------------------------------------------------------------------------------

#: The action distributions the lean forward computes (exact types: a subclass may change the computation)
_COVERED_DISTRIBUTIONS = (
    DiagGaussianDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
    StateDependentNoiseDistribution,
)
#: ``ActorCriticPolicy`` methods whose computation the lean forward repeats (a policy overriding one falls back)
_REPEATED_METHODS = ("forward", "extract_features", "_get_action_dist_from_latent")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # the constant as torch's Normal.log_prob computes it

Layer = Callable[[th.Tensor], th.Tensor]


@functools.cache
def _multinomial_is_exponential_race(device: th.device) -> bool:
    """Whether ``th.multinomial(p, 1, replacement=True)`` on this device is ``argmax(p / E)`` with ``E`` drawn by
    ``exponential_()`` (the exponential-race form of the Gumbel-max trick, which torch uses for one sample).

    Checked once per device against torch itself, with private generators: if a torch version computes it
    otherwise, collection calls ``th.multinomial`` (and still draws exactly what SB3's collection draws).
    """
    for rows, events in ((1, 2), (3, 5), (16, 7)):
        draw, race = th.Generator(device=device), th.Generator(device=device)
        draw.manual_seed(rows * events)
        race.manual_seed(rows * events)
        probs = th.softmax(th.linspace(-2.0, 3.0, rows * events, device=device).reshape(rows, events).sin(), dim=-1)
        for _ in range(20):
            expected = th.multinomial(probs, 1, True, generator=draw).reshape(-1)
            if not th.equal((probs / th.empty_like(probs).exponential_(generator=race)).argmax(dim=-1), expected):
                return False
        if not th.equal(th.rand(4, generator=draw, device=device), th.rand(4, generator=race, device=device)):
            return False  # the same results, but not the same amount of the random stream consumed
    return True


def _layer(module: nn.Module, fresh_input: bool = False) -> Layer:
    """One layer of an MLP as a plain function of its own parameters (the op its ``forward`` runs).

    :param fresh_input: whether the layer's input is a new tensor used by nothing else (the output of a linear
        layer), so that an activation may overwrite it
    """
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        if bias is None:
            return lambda x: F.linear(x, weight)
        # what F.linear runs for a batch with a bias, with the transposed weight (a view) made once per rollout
        weight_t = weight.t()
        return lambda x: th.addmm(bias, x, weight_t)
    if type(module) is nn.Tanh:
        return th.tanh_ if fresh_input else th.tanh
    if type(module) is nn.ReLU:
        return th.relu_ if fresh_input else th.relu
    return module.forward  # any other activation: its own forward, without nn.Module's call machinery


def _mlp(sequential: nn.Sequential) -> Layer:
    """An ``nn.Sequential`` of leaf modules as one function."""
    modules = list(sequential)
    layers = [_layer(m, fresh_input=i > 0 and type(modules[i - 1]) is nn.Linear) for i, m in enumerate(modules)]

    def run(x: th.Tensor) -> th.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    return run


def lean_collection_gap(policy: BasePolicy, rollout_buffer: RolloutBuffer) -> str | None:
    """Why the lean collection cannot stand in for SB3's with this policy and buffer, or ``None`` if it can.

    It repeats the computation of ``ActorCriticPolicy.forward`` with its standard parts: SB3's ``MlpExtractor``
    over ``nn.Sequential`` layers, ``nn.Linear`` heads, SB3's five action distributions (gSDE without squashing),
    any features extractor (called as it is), and SB3's own two rollout buffers (written directly). Anything
    else may compute or store something different, so it is left to SB3's loop.

    :param policy: the model's policy
    :param rollout_buffer: the buffer to fill
    """
    if not isinstance(policy, ActorCriticPolicy):
        return f"the policy class {type(policy).__name__} is not an ActorCriticPolicy"
    for method in _REPEATED_METHODS:
        if getattr(type(policy), method) is not getattr(ActorCriticPolicy, method):
            return f"the policy class {type(policy).__name__} overrides {method}"
    if type(policy.mlp_extractor) is not MlpExtractor:
        return f"the policy's mlp_extractor is a {type(policy.mlp_extractor).__name__}, not SB3's MlpExtractor"
    nets = (policy.mlp_extractor.policy_net, policy.mlp_extractor.value_net)
    if any(type(net) is not nn.Sequential or any(len(list(m.children())) for m in net) for net in nets):
        return "the policy's MlpExtractor networks are not flat nn.Sequential stacks"
    if type(policy.action_net) is not nn.Linear or type(policy.value_net) is not nn.Linear:
        return "the policy's action_net or value_net is not an nn.Linear"
    if type(policy.action_dist) not in _COVERED_DISTRIBUTIONS:
        return f"the action distribution {type(policy.action_dist).__name__} is not one of SB3's five"
    if isinstance(policy.action_dist, StateDependentNoiseDistribution) and policy.action_dist.bijector is not None:
        return "gSDE with squashed actions (squash_output=True)"
    if type(rollout_buffer) not in (RolloutBuffer, DictRolloutBuffer):
        return f"the rollout buffer class {type(rollout_buffer).__name__} is not SB3's RolloutBuffer or DictRolloutBuffer"
    global_hooks = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    if any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in policy.modules()):
        return "forward hooks are registered on the policy's modules"
    return None


class LeanForward:
    """``ActorCriticPolicy.forward`` for collection, as the same tensor ops on the policy's own parameters.

    SB3's forward builds a ``torch.distributions`` object with argument validation at every step and goes through
    a dozen ``nn.Module`` calls; this runs the ops those compute, in the same order, and draws the same random
    numbers from torch's generator (so the samples, values and log-probabilities are bit-identical). Built once
    per rollout from the policy as it is then (see :func:`lean_collection_gap` for what it covers).

    :param policy: a policy for which :func:`lean_collection_gap` found nothing
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        self.policy = policy
        extractor = policy.mlp_extractor
        self._actor_mlp, self._critic_mlp = _mlp(extractor.policy_net), _mlp(extractor.value_net)
        self._value_head, self._action_head = _layer(policy.value_net), _layer(policy.action_net)
        self._action_shape = (-1, *(policy.action_space.shape or ()))
        self._on_cpu = policy.device.type == "cpu"
        self._std_version = self._sde_version = -1
        self._sde_variance: th.Tensor
        self._std: tuple[th.Tensor, np.ndarray, np.ndarray]
        space = policy.observation_space
        # flat Box observations through FlattenExtractors: their float32 batches are the features themselves
        self._float_vectors = (
            type(space) is spaces.Box
            and len(space.shape) == 1
            and type(policy.pi_features_extractor) is FlattenExtractor
            and type(policy.vf_features_extractor) is FlattenExtractor
        )
        self._sample = {
            DiagGaussianDistribution: self._diag_gaussian,
            CategoricalDistribution: self._categorical,
            MultiCategoricalDistribution: self._multi_categorical,
            BernoulliDistribution: self._bernoulli,
            StateDependentNoiseDistribution: self._state_dependent_noise,
        }[type(policy.action_dist)]

    def _features(self, obs: PyTorchObs, extractor: nn.Module) -> th.Tensor:
        policy = self.policy
        if self._float_vectors:
            # what preprocess_obs does to a Box batch; nn.Flatten returns a (batch, n) batch as it is
            return obs.float()  # type: ignore[union-attr]
        preprocessed = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
        if type(extractor) is FlattenExtractor:
            return preprocessed.flatten(1)  # type: ignore[union-attr]  # nn.Flatten's op
        return extractor(preprocessed)

    def __call__(self, obs: PyTorchObs) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
        """:return: actions (as the numpy array SB3 makes of them), values and log-probabilities, as
        ``policy(obs)`` computes them"""
        policy = self.policy
        if policy.share_features_extractor:
            pi_features = vf_features = self._features(obs, policy.features_extractor)
        else:
            pi_features = self._features(obs, policy.pi_features_extractor)
            vf_features = self._features(obs, policy.vf_features_extractor)
        latent_pi, latent_vf = self._actor_mlp(pi_features), self._critic_mlp(vf_features)
        values = self._value_head(latent_vf)
        actions, log_prob = self._sample(latent_pi)
        return actions.reshape(self._action_shape), values, log_prob

    # The samplers below draw from torch's generator with the very calls torch.distributions makes, then finish
    # on the CPU in numpy where the remaining ops are exactly rounded IEEE arithmetic, indexing or argmax (the
    # same results as torch's, bit for bit, at a fraction of the per-op cost); exp, log and sums stay in torch.

    def _gaussian_std(self) -> tuple[th.Tensor, np.ndarray, np.ndarray]:
        """exp(log_std) and the parts of the Gaussian log-density that depend on it only, recomputed when log_std
        changes (SB3 broadcasts them to every row: the same values)."""
        log_std = self.policy.log_std
        if self._std_version != log_std._version:
            std = log_std.exp()
            self._std = std, (2 * std**2).cpu().numpy(), std.log().cpu().numpy()
            self._std_version = log_std._version
        return self._std

    def _diag_gaussian(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        mean = self._action_head(latent_pi)
        std, two_var, log_std = self._gaussian_std()
        noise = th.empty_like(mean).normal_()  # Normal.rsample's draw: one standard normal per entry
        if not self._on_cpu:
            actions = mean + noise * std
            return actions.cpu().numpy(), self._gaussian_log_prob(actions, mean, std)
        mean_np = mean.numpy()
        actions_np = mean_np + noise.numpy() * std.numpy()
        deviation = actions_np - mean_np
        # torch's Normal.log_prob term by term, then SB3's sum over action dimensions (in torch)
        terms = -(deviation * deviation) / two_var - log_std - _LOG_SQRT_2PI
        return actions_np, th.from_numpy(terms).sum(dim=1)

    @staticmethod
    def _gaussian_log_prob(actions: th.Tensor, mean: th.Tensor, std: th.Tensor) -> th.Tensor:
        # torch's Normal.log_prob, summed over action dimensions as SB3's sum_independent_dims does
        return (-((actions - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI).sum(dim=1)

    def _state_dependent_noise(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        distribution = self.policy.action_dist
        assert isinstance(distribution, StateDependentNoiseDistribution)
        mean = self._action_head(latent_pi)
        log_std = self.policy.log_std
        if self._sde_version != log_std._version:  # the squared std matrix depends on log_std only
            self._sde_variance = distribution.get_std(log_std) ** 2
            self._sde_version = log_std._version
        std = th.sqrt(th.mm(latent_pi**2, self._sde_variance) + distribution.epsilon)
        # gSDE draws no random numbers here: its noise comes from the exploration matrices sampled by reset_noise
        noise = distribution.get_noise(latent_pi)
        if not self._on_cpu:
            actions = mean + noise
            return actions.cpu().numpy(), self._gaussian_log_prob(actions, mean, std)
        mean_np = mean.numpy()
        actions_np = mean_np + noise.numpy()
        deviation = actions_np - mean_np
        std_np = std.numpy()
        terms = -(deviation * deviation) / (2 * (std_np * std_np)) - std.log().numpy() - _LOG_SQRT_2PI
        return actions_np, th.from_numpy(terms).sum(dim=1)

    def _categorical_sample(self, logits: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        # torch's Categorical: normalized logits, one multinomial draw per row from their softmax
        log_pmf = logits - logits.logsumexp(dim=-1, keepdim=True)
        probs = F.softmax(log_pmf, dim=-1)
        if not (self._on_cpu and _multinomial_is_exponential_race(probs.device)):
            actions = th.multinomial(probs, 1, True).T.reshape(-1)
            return actions.cpu().numpy(), log_pmf.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        # what th.multinomial(probs, 1, True) computes, without its validity checks (each a synchronization)
        race = th.empty_like(probs).exponential_()
        actions_np = (probs.numpy() / race.numpy()).argmax(axis=-1)
        return actions_np, th.from_numpy(log_pmf.numpy()[np.arange(len(actions_np)), actions_np])

    def _categorical(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        return self._categorical_sample(self._action_head(latent_pi))

    def _multi_categorical(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        logits = self._action_head(latent_pi)
        distribution = self.policy.action_dist
        assert isinstance(distribution, MultiCategoricalDistribution)
        samples = [self._categorical_sample(split) for split in th.split(logits, list(distribution.action_dims), dim=1)]
        actions = np.stack([action for action, _ in samples], axis=1)
        return actions, th.stack([log_prob for _, log_prob in samples], dim=1).sum(dim=1)

    def _bernoulli(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        logits = self._action_head(latent_pi)
        actions = th.bernoulli(th.sigmoid(logits))
        log_prob = (-F.binary_cross_entropy_with_logits(logits, actions, reduction="none")).sum(dim=1)
        return actions.cpu().numpy(), log_prob


def _store(
    buffer: RolloutBuffer,
    obs: np.ndarray | dict[str, np.ndarray],
    actions: np.ndarray,
    rewards: np.ndarray,
    episode_starts: np.ndarray,
    values: th.Tensor,
    log_probs: th.Tensor,
) -> None:
    """What ``RolloutBuffer.add`` / ``DictRolloutBuffer.add`` store, written once into their arrays (they copy each
    field into a new array first). The reshapes are theirs: Discrete observations and every action space."""
    pos = buffer.pos
    if isinstance(buffer.observations, dict):
        assert isinstance(obs, dict)
        for key, array in buffer.observations.items():
            array[pos] = np.reshape(obs[key], array.shape[1:])
    else:
        assert isinstance(obs, np.ndarray)
        buffer.observations[pos] = np.reshape(obs, buffer.observations.shape[1:])
    buffer.actions[pos] = actions.reshape(buffer.actions.shape[1:])
    buffer.rewards[pos] = rewards
    buffer.episode_starts[pos] = episode_starts
    buffer.values[pos] = values.cpu().numpy().reshape(-1)
    buffer.log_probs[pos] = log_probs.cpu().numpy()
    buffer.pos += 1
    if buffer.pos == buffer.buffer_size:
        buffer.full = True


def lean_collect_rollouts(
    model: OnPolicyAlgorithm,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
) -> bool:
    """SB3's ``OnPolicyAlgorithm.collect_rollouts`` with the policy's forward done by :class:`LeanForward` and the
    buffer written directly: the same data, random numbers, callbacks and bookkeeping, step for step.

    The caller checks :func:`lean_collection_gap` first.

    :param model: the algorithm (its policy, last observation and episode starts, counters and settings)
    :param env: the training environment
    :param callback: called at the rollout's start, at every step (with SB3's local names), and at its end
    :param rollout_buffer: the buffer to fill (its GAE is computed by SB3 at the end)
    :param n_rollout_steps: steps to collect per environment
    :return: ``False`` if a callback stopped the rollout early, as SB3's returns
    """
    assert model._last_obs is not None, "No previous observation was provided"
    policy = model.policy
    assert isinstance(policy, ActorCriticPolicy)
    policy.set_training_mode(False)
    forward = LeanForward(policy)
    box_actions = isinstance(model.action_space, spaces.Box)
    discrete_actions = isinstance(model.action_space, spaces.Discrete)
    low, high = (model.action_space.low, model.action_space.high) if box_actions else (None, None)  # type: ignore[attr-defined]

    n_steps = 0
    rollout_buffer.reset()
    if model.use_sde:
        policy.reset_noise(env.num_envs)
    callback.on_rollout_start()

    while n_steps < n_rollout_steps:
        if model.use_sde and model.sde_sample_freq > 0 and n_steps % model.sde_sample_freq == 0:
            policy.reset_noise(env.num_envs)
        with th.no_grad():
            obs_tensor = obs_as_tensor(model._last_obs, model.device)  # type: ignore[arg-type]
            actions, values, log_probs = forward(obs_tensor)
        if np.isnan(log_probs.cpu().numpy()).any():
            # SB3's torch.distributions refuse NaN parameters (validation); NaN log-probabilities are their trace here
            raise ValueError(
                "The policy's action distribution has NaN parameters (means or logits), so no action can be sampled: "
                "the observations or the policy's parameters are not finite."
            )
        clipped_actions = actions
        if box_actions:
            clipped_actions = policy.unscale_action(clipped_actions) if policy.squash_output else np.clip(actions, low, high)

        new_obs, rewards, dones, infos = env.step(clipped_actions)
        model.num_timesteps += env.num_envs

        # SB3 hands its locals() to the callbacks: these are the names and types callbacks read
        callback.update_locals(
            {
                "self": model,
                "env": env,
                "callback": callback,
                "rollout_buffer": rollout_buffer,
                "n_rollout_steps": n_rollout_steps,
                "n_steps": n_steps,
                "obs_tensor": obs_tensor,
                "actions": actions,
                "values": values,
                "log_probs": log_probs,
                "clipped_actions": clipped_actions,
                "new_obs": new_obs,
                "rewards": rewards,
                "dones": dones,
                "infos": infos,
            }
        )
        if not callback.on_step():
            return False

        model._update_info_buffer(infos, dones)
        n_steps += 1
        if discrete_actions:
            actions = actions.reshape(-1, 1)

        # a truncated episode's last reward is bootstrapped with the value of its terminal observation (SB3 #633)
        for idx, done in enumerate(dones):
            if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated", False):
                terminal_obs = policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                with th.no_grad():
                    terminal_value = policy.predict_values(terminal_obs)[0]
                rewards[idx] += model.gamma * terminal_value

        _store(rollout_buffer, model._last_obs, actions, rewards, model._last_episode_starts, values, log_probs)  # type: ignore[arg-type]
        model._last_obs = new_obs  # type: ignore[assignment]
        model._last_episode_starts = dones

    with th.no_grad():
        values = policy.predict_values(obs_as_tensor(new_obs, model.device))  # type: ignore[arg-type]
    rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
    callback.update_locals({"values": values, "dones": dones, "new_obs": new_obs, "n_steps": n_steps})
    callback.on_rollout_end()
    return True
