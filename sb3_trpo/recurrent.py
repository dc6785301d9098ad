"""``RecurrentTRPO``: the trust-region update of :class:`~sb3_trpo.TRPO` for recurrent (LSTM, GRU, RNN) policies.

It follows ``sb3_contrib.RecurrentPPO``'s conventions and reuses its pieces: the recurrent policies
(``MlpLstmPolicy``, ``CnnLstmPolicy``, ``MultiInputLstmPolicy``, with a choice of cell:
:mod:`sb3_trpo.recurrent_policies`), the rollout buffers that store the LSTM states
before each step and cut the rollout into padded sequences. It collects as ``RecurrentPPO``'s loop does
(:func:`recurrent_collect_rollouts`, tested bit for bit against it), with masks for the maskable recurrent class.
sb3-contrib is an optional dependency, imported only by the modules that need it (``pip install "sb3-trpo[recurrent]"``).

The policy step sees one set of sequences for everything: the buffer's ``get()`` cuts the rollout at a random
point, so it is drawn once per update, and the surrogate, its gradient, every Fisher-vector product and every
line-search candidate are computed on it. Each sequence starts from the LSTM state stored at collection (the
behaviour policy's, detached), and an episode start inside a sequence resets the state, as in collection. Padding
rows have weight 0 in every mean. The Fisher-vector products run on autograd's graph through time (``Jᵀ M J`` with
the closed-form ``M``); the policy step runs its forward passes in evaluation mode (no LSTM dropout: every product
and candidate sees the same network) and, on CUDA, without cuDNN (whose RNN kernels have no double backward).
"""

import contextlib
import inspect
from typing import Any, ClassVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor
from stable_baselines3.common.type_aliases import GymEnv, PyTorchObs
from stable_baselines3.common.vec_env import VecEnv

try:
    from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    from sb3_contrib.common.recurrent.type_aliases import RNNStates
except ImportError as error:  # pragma: no cover - exercised in a subprocess without sb3-contrib
    raise ImportError(
        "RecurrentTRPO reuses sb3-contrib's recurrent policies, buffers and collection, and sb3-contrib is not "
        'installed: install it with `pip install "sb3-trpo[recurrent]"` (or `pip install sb3-contrib`).'
    ) from error

from sb3_trpo.actor import ActorView, PolicyEvaluation, RecurrentContext
from sb3_trpo.fisher import FisherProduct, JacobianFisherProduct
from sb3_trpo.policy_step import PolicyStepResult, RolloutBatch, trust_region_step
from sb3_trpo.recurrent_collection import lean_recurrent_collection_gap, recurrent_collect_rollouts
from sb3_trpo.recurrent_policies import CnnLstmPolicy, MlpLstmPolicy, MultiInputLstmPolicy, RecurrentCellActorCriticPolicy
from sb3_trpo.sequences import SequenceDictRolloutBuffer, SequenceRolloutBuffer
from sb3_trpo.trpo import TRPO
from sb3_trpo.validation import check_policy_class

__all__ = ["RecurrentTRPO"]


def without_cudnn(device: th.device) -> contextlib.AbstractContextManager[Any]:
    """cuDNN off on CUDA devices: autograd has no double backward through cuDNN's RNN kernels, which the Fisher-vector
    product needs; PyTorch's own LSTM ops have one. Elsewhere nothing changes.

    :param device: where the policy runs
    """
    return th.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def fold_sequence_starts(context: RecurrentContext) -> RecurrentContext:
    """The same computation with the episode starts at the first step of a sequence folded into its initial state.

    sb3-contrib's LSTM forward resets the state where an episode starts (``state · (1 - start)``) and, if any start
    is set, runs the LSTM one step at a time in Python. The buffer cuts sequences at episode starts, so they sit at
    sequence starts only: multiplying those sequences' initial states by ``1 - start`` and clearing the flags gives
    the same outputs, computed by one LSTM call over whole sequences (several times faster, and its graph, through
    which every Fisher-vector product runs, is smaller). Starts inside a sequence are left as they are.

    :param context: the initial states ``(h, c)``, each ``(layers, n_seq, hidden)``, and the flat episode starts
    """
    (hidden, cell), starts = context
    n_seq = hidden.shape[1]
    by_sequence = starts.reshape(n_seq, -1)
    keep = (1.0 - by_sequence[:, 0]).to(hidden.dtype).reshape(1, n_seq, 1)
    folded = by_sequence.clone()
    folded[:, 0] = 0.0
    return (hidden * keep, cell * keep), folded.reshape(-1)


def has_multi_discrete_leaf(space: spaces.Space) -> bool:
    """:return: whether ``space`` is, or a Dict space holds, a MultiDiscrete space"""
    if isinstance(space, spaces.Dict):
        return any(has_multi_discrete_leaf(subspace) for subspace in space.spaces.values())
    return isinstance(space, spaces.MultiDiscrete)


def default_features_extractor(policy_class: type[BasePolicy]) -> type[BaseFeaturesExtractor]:
    """:return: the features extractor ``policy_class`` builds when ``policy_kwargs`` names none (the default of the
    first constructor along the class's MRO that names one: a subclass may pass its arguments on as ``**kwargs``)"""
    for cls in policy_class.__mro__:
        parameter = inspect.signature(cls.__init__).parameters.get("features_extractor_class")  # type: ignore[misc]
        if parameter is not None:
            if parameter.default is inspect.Parameter.empty:
                break
            extractor: type[BaseFeaturesExtractor] = parameter.default
            return extractor
    return FlattenExtractor


class IntegerFeaturesDim:
    """A features extractor class whose extractors report ``features_dim`` as a Python ``int``.

    SB3 counts the features of a MultiDiscrete observation as ``sum(nvec)``, a numpy integer, and sb3-contrib's
    recurrent policies pass it to ``nn.LSTM(input_size=...)``, which refuses anything but ``int`` (RecurrentPPO
    cannot be built on such observations). Used as ``features_extractor_class`` while the policy is built.

    :param extractor_class: the features extractor class to build
    """

    def __init__(self, extractor_class: type[BaseFeaturesExtractor]) -> None:
        self.extractor_class = extractor_class

    def __call__(self, observation_space: spaces.Space, **kwargs: Any) -> BaseFeaturesExtractor:
        extractor = self.extractor_class(observation_space, **kwargs)
        extractor._features_dim = int(extractor.features_dim)
        return extractor


class RecurrentEvaluator:
    """The batch of sequences of one policy step (see :class:`~sb3_trpo.policy_step.Evaluator`).

    :param actor: the actor view
    :param obs: the observations, sequence after sequence, padded to one length
    :param actions: the actions, padded the same way
    :param context: the LSTM states at the start of each sequence (detached) and the episode starts
    :param weights: 1 for a real step, 0 for padding
    :param damping: λ of the Fisher-vector product
    :param action_masks: the valid actions of each step, padded likewise (``None``: no masking)
    """

    needs_graph = True  # the Fisher product runs on the gradient's forward pass through time

    def __init__(
        self,
        actor: ActorView,
        obs: PyTorchObs,
        actions: th.Tensor,
        context: RecurrentContext,
        weights: th.Tensor,
        damping: float,
        action_masks: th.Tensor | None = None,
    ) -> None:
        self.actor = actor
        self.weights: th.Tensor | None = weights
        self._obs, self._actions, self._context, self._damping = obs, actions, context, damping
        self._masks = action_masks
        self._device = weights.device

    def evaluate(self, theta: th.Tensor) -> PolicyEvaluation:
        with without_cudnn(self._device):
            return self.actor.evaluate(theta, self._obs, self._actions, self._masks, context=self._context)

    def fisher_product(self, theta: th.Tensor, current: PolicyEvaluation) -> FisherProduct:
        return JacobianFisherProduct(theta, current.params, damping=self._damping, weights=self.weights)


class RecurrentTRPO(TRPO):
    """
    Trust Region Policy Optimization with recurrent (LSTM, GRU or RNN) policies.

    The same algorithm, keywords, checks and logged values as :class:`~sb3_trpo.TRPO`, with
    ``sb3_contrib.RecurrentPPO``'s policies and conventions: ``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``,
    ``"MultiInputLstmPolicy"`` (:class:`~sb3_trpo.recurrent_policies.RecurrentCellActorCriticPolicy` and its forms,
    or any ``RecurrentActorCriticPolicy`` subclass) with their options (``lstm_hidden_size``, ``n_lstm_layers``,
    ``shared_lstm``, ``enable_critic_lstm``, ``lstm_kwargs``, and ``recurrent_layer_type="lstm" | "gru" | "rnn"``), and
    ``predict(obs, state, episode_start, deterministic)``. Rollouts are collected as ``RecurrentPPO``'s loop collects them into
    sb3-contrib's recurrent buffers; the policy step works on the rollout's padded sequences (see the module's
    docstring), and the critic step regresses the values over minibatches of sequences, real steps only.

    ``sub_sampling_factor`` must be 1 (a sub-sample of rows would cut the sequences the LSTM reads).

    :param policy: the policy (``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``, ``"MultiInputLstmPolicy"``, or a
        ``RecurrentActorCriticPolicy`` subclass)
    :param env: the environment to learn from (if registered in Gym, can be str)
    :param kwargs: the other arguments of :class:`~sb3_trpo.TRPO` (as keywords), with the same meaning and checks
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    policy: RecurrentActorCriticPolicy
    _evaluator_class: ClassVar[type[RecurrentEvaluator]] = RecurrentEvaluator

    _policy_base = RecurrentActorCriticPolicy
    _policy_kind = "recurrent"
    #: the buffers that store what the policy step needs of each step (for vector observations, for Dict ones)
    _buffer_classes: ClassVar[tuple[type[Any], type[Any]]] = (SequenceRolloutBuffer, SequenceDictRolloutBuffer)
    #: the buffers a user may pass (``rollout_buffer_class``): subclasses of these store what the step needs
    _accepted_buffers: ClassVar[tuple[type[Any], ...]] = (RecurrentRolloutBuffer, RecurrentDictRolloutBuffer)
    #: the buffers whose ``add`` the lean loop repeats (exact types)
    _lean_buffers: ClassVar[tuple[type[Any], ...]] = (*_buffer_classes, *_accepted_buffers)

    def __init__(self, policy: str | type[RecurrentActorCriticPolicy], env: GymEnv | str, **kwargs: Any):
        check_policy_class(type(self).__name__, policy, self._policy_base, self._policy_kind, list(self.policy_aliases))
        kwargs.setdefault("distributed_critic", "gradients")
        self._check_variant_arguments(kwargs)
        init_setup_model = kwargs.pop("_init_setup_model", True)
        super().__init__(policy, env, _init_setup_model=False, **kwargs)
        if init_setup_model:  # as TRPO does when it sets up the model itself
            if self.env is not None:
                self._check_rollout_size()
            self._setup_model()

    @classmethod
    def _check_variant_arguments(cls, arguments: dict[str, Any]) -> None:
        """Refuse the keywords of TRPO that RecurrentTRPO cannot honour (given to the constructor or to ``load``).

        :param arguments: keyword arguments by name
        :raises ValueError: naming the keyword, its value and what is allowed
        """
        if arguments.get("sub_sampling_factor", 1) != 1:
            raise ValueError(
                f"sub_sampling_factor={arguments['sub_sampling_factor']!r} is not allowed with RecurrentTRPO: it must be "
                "1 (every k-th row of a batch of sequences is no sequence the LSTM could read)."
            )
        if arguments.get("distributed_critic", "gradients") != "gradients":
            raise ValueError(
                f"distributed_critic={arguments['distributed_critic']!r} is not allowed with RecurrentTRPO: it must be "
                '"gradients" (its critic regresses over padded sequences drawn anew by each rank\'s buffer, whose '
                "minibatch gradients are all-reduced)."
            )

    def _setup_policy_and_buffer(self) -> None:
        """RecurrentPPO's set-up: the recurrent policy, a buffer that stores its LSTM states, zero initial states."""
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        policy_kwargs = dict(self.policy_kwargs)
        if "recurrent_layer_type" in policy_kwargs and not issubclass(self.policy_class, RecurrentCellActorCriticPolicy):
            raise ValueError(
                f"policy_kwargs has recurrent_layer_type={policy_kwargs['recurrent_layer_type']!r}, which "
                f"{self.policy_class.__name__} does not take: the cell is an option of {type(self).__name__}'s policies "
                f"({', '.join(repr(alias) for alias in self.policy_aliases)}) and of subclasses of "
                f"{RecurrentCellActorCriticPolicy.__module__}.{RecurrentCellActorCriticPolicy.__qualname__}."
            )
        extractor_class = None
        if has_multi_discrete_leaf(self.observation_space):
            extractor_class = policy_kwargs.get("features_extractor_class", default_features_extractor(self.policy_class))
            policy_kwargs["features_extractor_class"] = IntegerFeaturesDim(extractor_class)
        policy = self.policy_class(
            self.observation_space, self.action_space, self.lr_schedule, use_sde=self.use_sde, **policy_kwargs
        )
        if not isinstance(policy, self._policy_base):
            raise ValueError(f"{type(self).__name__} needs a {self._policy_base.__name__}, got {type(policy).__name__}.")
        if extractor_class is not None:  # the wrapper was needed while the LSTM was built only
            policy.features_extractor_class = extractor_class
        self.policy = policy.to(self.device)
        lstm = self.policy.lstm_actor
        state_shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)
        self._last_lstm_states = RNNStates(
            (th.zeros(state_shape, device=self.device), th.zeros(state_shape, device=self.device)),
            (th.zeros(state_shape, device=self.device), th.zeros(state_shape, device=self.device)),
        )
        vector_buffer, dict_buffer = self._buffer_classes
        if self.rollout_buffer_class is None:
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = dict_buffer if dict_obs else vector_buffer
        elif not issubclass(self.rollout_buffer_class, self._accepted_buffers):
            raise ValueError(
                f"rollout_buffer_class={self.rollout_buffer_class.__name__} cannot store what {type(self).__name__} "
                f"needs of each step: it needs {' or '.join(c.__name__ for c in self._accepted_buffers)} (or a subclass), "
                "or None."
            )
        buffer_class: Any = self.rollout_buffer_class  # a recurrent buffer: it takes the LSTM states' shape
        self.rollout_buffer = buffer_class(
            self.n_steps,
            self.observation_space,  # a Dict space for the Dict buffer
            self.action_space,
            (self.n_steps, lstm.num_layers, self.n_envs, lstm.hidden_size),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self.rollout_buffer_kwargs,
        )

    def _excluded_save_params(self) -> list[str]:
        # as RecurrentPPO: the LSTM states of the last rollout belong to its environments, not to the model
        return [*super()._excluded_save_params(), "_last_lstm_states"]

    _general_loop = "the recurrent loop with the policy's own forward and the buffer's add"

    def _lean_collection_gap(self, rollout_buffer: RolloutBuffer) -> str | None:
        return lean_recurrent_collection_gap(self.policy, rollout_buffer, self._policy_base, self._lean_buffers)

    def _lean_collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        masks_of = self._action_masks_of()
        return recurrent_collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps, masks_of, lean=True)

    def _general_collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        return recurrent_collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps, self._action_masks_of())

    def _rollout_batch(self) -> RolloutBatch:
        """The whole rollout as one batch of padded sequences, drawn once for the update (the buffer cuts the
        sequences at a random point at every draw)."""
        # sb3-contrib's RecurrentRolloutBufferSamples or RecurrentDictRolloutBufferSamples
        data: Any = next(self.rollout_buffer.get(batch_size=None))
        # sb3-contrib's recurrent buffers keep the action space's dtype (int8 for MultiBinary, which Bernoulli's
        # log-probability refuses); SB3's own buffers hand out float32 actions: so do these
        actions = data.actions.float()
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        weights = (data.mask > 1e-8).to(data.advantages.dtype)
        advantages = data.advantages
        if self.normalize_advantage:
            # statistics of the real steps of every rank
            mean, std = self._replica.weighted_mean_and_std(advantages, weights)
            advantages = (advantages - mean) / (std + 1e-8)
        lstm_states = data.lstm_states.pi
        context = fold_sequence_starts(((lstm_states[0].detach(), lstm_states[1].detach()), data.episode_starts))
        return RolloutBatch(
            data.observations,
            actions,
            data.old_log_prob,
            advantages,
            data.returns,
            data.old_values,
            action_masks=self._batch_masks(data),
            context=context,
            weights=weights,
        )

    def _evaluator(self, actor: ActorView, batch: RolloutBatch) -> RecurrentEvaluator:
        """The policy step's view of the rollout's sequences (``_evaluator_class``: a variant may compute its Fisher
        product otherwise)."""
        assert batch.context is not None
        assert batch.weights is not None
        return self._evaluator_class(
            actor, batch.observations, batch.actions, batch.context, batch.weights, self.cg_damping, batch.action_masks
        )

    def _policy_step(self, actor: ActorView, batch: RolloutBatch, target_kl: float) -> PolicyStepResult:
        """The trust-region step on the rollout's sequences, in evaluation mode (no dropout inside the step)."""
        assert batch.context is not None
        assert batch.weights is not None
        evaluator = self._evaluator(actor, batch)
        self.policy.set_training_mode(False)
        try:
            step = trust_region_step(
                evaluator, batch.old_log_prob, batch.advantages, self._step_settings(target_kl), self._replica
            )
        finally:
            self.policy.set_training_mode(True)
        return self._checked(step)

    def _regress_critic(self, params: list[th.nn.Parameter], actor_ids: set[int], batch: RolloutBatch) -> float:
        """``n_critic_updates`` epochs of masked-MSE regression over minibatches of sequences (each epoch draws its own
        sequences from the buffer, as RecurrentPPO's epochs do)."""
        optimizer = self.policy.optimizer
        optimizer.zero_grad(set_to_none=True)  # the actor's gradients stay None: the optimizer leaves it alone
        losses = []
        for _ in range(self.n_critic_updates):
            minibatch: Any  # sb3-contrib's recurrent samples
            for minibatch in self.rollout_buffer.get(self.batch_size):
                real = minibatch.mask > 1e-8
                states = minibatch.lstm_states.pi if self.policy.shared_lstm else minibatch.lstm_states.vf
                states, starts = fold_sequence_starts((states, minibatch.episode_starts))
                values = self.policy.predict_values(minibatch.observations, states, starts).flatten()
                loss = ((minibatch.returns - values) ** 2)[real].mean()
                grads = th.autograd.grad(loss, params, allow_unused=True)
                if self._replica.is_distributed:
                    # every rank's minibatch holds the same number of real steps (the buffer takes batch_size steps,
                    # then pads; the ranks' rollouts are of one size), so the mean over ranks of the masked means is
                    # the masked mean over the union of the minibatches
                    grads = tuple(self._replica.mean_of_tensors(grads, params))
                for param, grad in zip(params, grads, strict=True):
                    param.grad = grad
                optimizer.step()
                losses.append(loss.detach())
        return self._replica.mean_of_floats([th.stack(losses).mean().item()], self.device)[0]
