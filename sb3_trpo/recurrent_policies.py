"""Recurrent policies with a choice of cell: ``recurrent_layer_type="lstm" | "gru" | "rnn"``.

sb3-contrib's ``RecurrentActorCriticPolicy`` builds ``nn.LSTM`` layers and threads an LSTM's two states ``(h, c)``
through everything around them: ``RNNStates``, the rollout buffers (which store both before each step), the
sequence forward (``_process_sequence``) and ``predict``'s state. A GRU or an Elman RNN has one state. Rather than
new buffers, states and forwards for it, the GRU and RNN layers here take and return the LSTM's pair: the cell runs
on ``h`` and hands the second tensor back as it came (it starts as zeros and stays so). Everything built for the
LSTM then works for every cell unchanged, at the cost of one unused state tensor per step in the buffer.

The option names stay the LSTM's (``lstm_hidden_size``, ``n_lstm_layers``, ``shared_lstm``, ``enable_critic_lstm``,
``lstm_kwargs``) and mean the same for every cell, so a user switches cells with one keyword. With the default
``"lstm"`` the policy is sb3-contrib's, parameter for parameter and random number for random number.
"""

from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

try:
    from sb3_contrib.common.recurrent.policies import (
        RecurrentActorCriticCnnPolicy,
        RecurrentActorCriticPolicy,
        RecurrentMultiInputActorCriticPolicy,
    )
except ImportError as error:  # pragma: no cover - exercised in a subprocess without sb3-contrib
    raise ImportError(
        "The recurrent policies build on sb3-contrib's, and sb3-contrib is not installed: install it with "
        '`pip install "sb3-trpo[recurrent]"` (or `pip install sb3-contrib`).'
    ) from error

__all__ = [
    "RECURRENT_LAYER_TYPES",
    "CnnLstmPolicy",
    "MlpLstmPolicy",
    "MultiInputLstmPolicy",
    "PairStateGRU",
    "PairStateRNN",
    "RecurrentCellActorCriticCnnPolicy",
    "RecurrentCellActorCriticPolicy",
    "RecurrentCellMultiInputActorCriticPolicy",
    "check_recurrent_layer",
    "make_recurrent_layer",
]

#: the cells a policy can use, by the name ``recurrent_layer_type`` takes
RECURRENT_LAYER_TYPES = ("lstm", "gru", "rnn")
#: the keywords of ``lstm_kwargs`` each cell takes: torch's constructor keywords that keep the layer's input, output
#: and states in the shapes sb3-contrib's sequence code assumes (time-major, one direction, state size = hidden size)
CELL_KEYWORDS = {"lstm": ("bias", "dropout"), "gru": ("bias", "dropout"), "rnn": ("bias", "dropout", "nonlinearity")}


class PairStateGRU(nn.GRU):
    """``nn.GRU`` with ``nn.LSTM``'s state interface: ``forward(input, (h, c)) -> (output, (h', c))``.

    The GRU reads and updates ``h`` only; ``c`` is returned as it came, so the pair fits sb3-contrib's LSTM states.
    """

    def forward(self, input: th.Tensor, hx: Any = None) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:  # type: ignore[override]
        hidden, unused = hx
        output, new_hidden = super().forward(input, hidden)
        return output, (new_hidden, unused)


class PairStateRNN(nn.RNN):
    """``nn.RNN`` (Elman, ``tanh`` or ``relu``) with ``nn.LSTM``'s state interface, as :class:`PairStateGRU`."""

    def forward(self, input: th.Tensor, hx: Any = None) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:  # type: ignore[override]
        hidden, unused = hx
        output, new_hidden = super().forward(input, hidden)
        return output, (new_hidden, unused)


def check_recurrent_layer(recurrent_layer_type: Any, lstm_kwargs: dict[str, Any] | None) -> None:
    """Refuse a cell this policy does not have, and layer keywords that cell does not take.

    :param recurrent_layer_type: the cell's name
    :param lstm_kwargs: keywords for the layer's constructor
    :raises ValueError: naming what was passed and what is allowed
    """
    if recurrent_layer_type not in RECURRENT_LAYER_TYPES:
        raise ValueError(
            f"recurrent_layer_type={recurrent_layer_type!r} is not a recurrent cell this policy has: it must be one of "
            f"{', '.join(repr(name) for name in RECURRENT_LAYER_TYPES)}."
        )
    allowed = CELL_KEYWORDS[recurrent_layer_type]
    unknown = sorted(set(lstm_kwargs or {}) - set(allowed))
    if unknown:
        raise ValueError(
            f"lstm_kwargs has {', '.join(repr(k) for k in unknown)}, which a {recurrent_layer_type!r} layer of this "
            f"policy does not take: the keywords allowed are {', '.join(repr(k) for k in allowed)} (the sequence code "
            "needs time-major, one-directional layers whose state is the hidden size)."
        )


def make_recurrent_layer(
    recurrent_layer_type: str, input_size: int, hidden_size: int, num_layers: int, lstm_kwargs: dict[str, Any]
) -> nn.Module:
    """:return: the cell's layer, with ``nn.LSTM``'s call and state interface"""
    layer_class = {"lstm": nn.LSTM, "gru": PairStateGRU, "rnn": PairStateRNN}[recurrent_layer_type]
    layer: nn.Module = layer_class(input_size, hidden_size, num_layers=num_layers, **lstm_kwargs)
    return layer


class RecurrentCellActorCriticPolicy(RecurrentActorCriticPolicy):
    """sb3-contrib's ``RecurrentActorCriticPolicy`` (``MlpLstmPolicy``) with a choice of recurrent cell.

    :param observation_space: the observation space
    :param action_space: the action space
    :param lr_schedule: the critic's learning-rate schedule
    :param args: sb3-contrib's other arguments, in its order
    :param recurrent_layer_type: ``"lstm"`` (the default, sb3-contrib's policy), ``"gru"`` or ``"rnn"`` (Elman; its
        ``nonlinearity`` is ``"tanh"`` unless ``lstm_kwargs`` says ``"relu"``), for the actor's layer and the critic's
    :param kwargs: sb3-contrib's other keyword arguments (``lstm_hidden_size``, ``n_lstm_layers``, ``shared_lstm``,
        ``enable_critic_lstm``, ``lstm_kwargs``: the same meaning for every cell)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        recurrent_layer_type: str = "lstm",
        **kwargs: Any,
    ) -> None:
        lstm_kwargs = dict(kwargs.pop("lstm_kwargs", None) or {})
        check_recurrent_layer(recurrent_layer_type, lstm_kwargs)
        # sb3-contrib builds LSTMs first (below): with the keywords an LSTM takes too
        shared_keywords = {k: v for k, v in lstm_kwargs.items() if k in CELL_KEYWORDS["lstm"]}
        kwargs["lstm_kwargs"] = shared_keywords
        super().__init__(observation_space, action_space, lr_schedule, *args, **kwargs)
        self.lstm_kwargs = lstm_kwargs
        self.recurrent_layer_type = recurrent_layer_type
        if recurrent_layer_type == "lstm":
            return
        # sb3-contrib has built LSTMs (its constructor knows no other layer): the cell's layers replace them, and the
        # optimizer is made again over the parameters that remain, as sb3-contrib makes it
        num_layers, _, hidden_size = self.lstm_hidden_state_shape
        shape = (recurrent_layer_type, self.lstm_actor.input_size, hidden_size, num_layers, self.lstm_kwargs)
        self.lstm_actor = make_recurrent_layer(*shape)  # type: ignore[assignment]
        if self.lstm_critic is not None:
            self.lstm_critic = make_recurrent_layer(*shape)  # type: ignore[assignment]
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        # the recurrent settings too (sb3-contrib leaves them out, so its policy.save()/load() would rebuild another
        # network): a policy saved on its own comes back as it was
        data = super()._get_constructor_parameters()
        data.update(
            lstm_hidden_size=self.lstm_hidden_state_shape[2],
            n_lstm_layers=self.lstm_hidden_state_shape[0],
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            lstm_kwargs=self.lstm_kwargs,
            recurrent_layer_type=self.recurrent_layer_type,
        )
        return data


# Subclasses of RecurrentCellActorCriticPolicy (as sb3-contrib's CNN and Dict forms subclass its MLP one), so an
# isinstance check on the MLP form accepts every alias.
class RecurrentCellActorCriticCnnPolicy(RecurrentCellActorCriticPolicy, RecurrentActorCriticCnnPolicy):
    """:class:`RecurrentCellActorCriticPolicy` reading images (sb3-contrib's ``CnnLstmPolicy``, ``NatureCNN``)."""


class RecurrentCellMultiInputActorCriticPolicy(RecurrentCellActorCriticPolicy, RecurrentMultiInputActorCriticPolicy):
    """:class:`RecurrentCellActorCriticPolicy` reading Dict observations (sb3-contrib's ``MultiInputLstmPolicy``)."""


MlpLstmPolicy = RecurrentCellActorCriticPolicy
CnnLstmPolicy = RecurrentCellActorCriticCnnPolicy
MultiInputLstmPolicy = RecurrentCellMultiInputActorCriticPolicy
