"""The periodic evaluation of a run that learns with invalid-action masks (imported only by such runs: it needs
sb3-contrib)."""

from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback

from sb3_trpo.cli.callbacks import OneEvaluationEnvironment


class MaskedRunEvaluation(OneEvaluationEnvironment, MaskableEvalCallback):
    """sb3-contrib's ``MaskableEvalCallback`` (the evaluation environment's masks passed to ``predict``) for the one
    evaluation environment of a run, as :class:`~sb3_trpo.cli.callbacks.RunEvaluation` is SB3's ``EvalCallback``.

    :param eval_env: the evaluation environment (offering masks)
    :param kwargs: ``MaskableEvalCallback``'s other arguments
    """
