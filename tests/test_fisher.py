"""Fisher-vector products: the closed form Jᵀ M J against the explicit Hessian of the mean KL, against the
double-backprop reference, and against forward mode; the metric M against the KL's Hessian in parameter space."""

from functools import partial

import pytest
import torch as th
from torch.func import jvp

from sb3_trpo import TRPO
from sb3_trpo.actor import ActorView, mlp_fisher_product
from sb3_trpo.critic import MlpCriticRegression, critic_parameters
from sb3_trpo.distributions import DistributionParams, Family, fisher_metric_product, kl_divergence
from sb3_trpo.fisher import JacobianFisherProduct, kl_hessian_vector_product, mean_kl_from
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv, reference_kl, sample_batch, tiny_policy
from tests.test_actor import ValueEmbedding

POLICIES = {
    **{name: (space, {}) for name, space in ACTION_SPACES.items()},
    "gsde": (ACTION_SPACES["box"], {"use_sde": True}),
    "gsde-expln-squashed": (
        ACTION_SPACES["box"],
        {"use_sde": True, "use_expln": True, "squash_output": True, "full_std": False},
    ),
}
DAMPING = 0.1


def rebuilt_torch_dists(params: DistributionParams) -> list[th.distributions.Distribution]:
    """torch.distributions built from our parameter tensors (so the KL is computed by torch, not by us)."""
    if params.family is Family.GAUSSIAN:
        return [th.distributions.Normal(*params.tensors)]
    if params.family is Family.BERNOULLI:
        return [th.distributions.Bernoulli(logits=params.tensors[0])]
    return [th.distributions.Categorical(logits=t) for t in params.tensors]


def setup(name: str, n: int = 12):
    space, kwargs = POLICIES[name]
    policy = tiny_policy(space, **kwargs)
    obs, actions = sample_batch(policy, n=n)
    actor = ActorView(policy, obs)
    # SB3's preprocessing casts observations to float32, so the comparisons are at float32 precision
    return actor, obs, actions, actor.flat()


def products(actor, obs, actions, theta_old):
    """The three implementations, as functions v ↦ (F + λI) v."""
    with th.no_grad():
        old = actor.evaluate(theta_old, obs, actions).params
    theta = theta_old.clone().requires_grad_(True)
    fast = JacobianFisherProduct(theta, actor.evaluate(theta, obs, actions).params, damping=DAMPING)

    def params_at(t):
        return actor.evaluate(t, obs, actions).params.tensors

    forward = JacobianFisherProduct(
        theta, actor.evaluate(theta, obs, actions).params, damping=DAMPING, jvp=lambda v: jvp(params_at, (theta_old,), (v,))[1]
    )
    reference = kl_hessian_vector_product(
        mean_kl_from(old, lambda t: actor.evaluate(t, obs, actions).params), theta_old, damping=DAMPING
    )
    implementations = {"closed-form": fast, "forward-mode": forward, "double-backprop": reference}
    mlp = mlp_fisher_product(actor, obs, DAMPING)
    if mlp is not None:  # SB3's MLP actor: the written-out product too
        implementations["written-out-mlp"] = mlp
    return old, implementations


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_fisher_product_equals_the_explicit_kl_hessian(name):
    actor, obs, actions, theta_old = setup(name)
    old, implementations = products(actor, obs, actions, theta_old)
    old_torch = rebuilt_torch_dists(old)

    def torch_mean_kl(theta):
        return reference_kl(old_torch, rebuilt_torch_dists(actor.evaluate(theta, obs, actions).params)).mean()

    hessian = th.autograd.functional.hessian(torch_mean_kl, theta_old)
    assert hessian.shape == (actor.size, actor.size)
    assert hessian.abs().max() > 1e-3, "degenerate test: the Hessian is (nearly) zero"
    generator = th.Generator().manual_seed(0)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator)
        expected = hessian @ v + DAMPING * v
        for label, product in implementations.items():
            th.testing.assert_close(product(v), expected, rtol=1e-4, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.parametrize("name", list(POLICIES))
def test_closed_form_agrees_with_double_backprop_on_a_larger_batch(name):
    actor, obs, actions, theta_old = setup(name, n=256)
    _, implementations = products(actor, obs, actions, theta_old)
    generator = th.Generator().manual_seed(1)
    for _ in range(5):
        v = th.randn(actor.size, generator=generator)
        th.testing.assert_close(implementations["closed-form"](v), implementations["double-backprop"](v), rtol=1e-4, atol=1e-6)


def random_params(family: Family, n: int = 5) -> DistributionParams:
    generator = th.Generator().manual_seed(3)
    if family is Family.CATEGORICAL:
        return DistributionParams(family, (th.randn(n, 3, generator=generator), th.randn(n, 2, generator=generator)))
    if family is Family.BERNOULLI:
        return DistributionParams(family, (th.randn(n, 4, generator=generator),))
    return DistributionParams(family, (th.randn(n, 3, generator=generator), th.rand(n, 3, generator=generator) + 0.3))


@pytest.mark.parametrize("family", list(Family))
def test_metric_is_the_hessian_of_the_kl_in_parameter_space(family):
    params = random_params(family)
    shapes = [t.shape for t in params.tensors]
    sizes = [t.numel() for t in params.tensors]
    flat = th.cat([t.reshape(-1) for t in params.tensors]).double()

    def total_kl(x):
        tensors = tuple(c.view(s) for c, s in zip(th.split(x, sizes), shapes, strict=True))
        return kl_divergence(
            DistributionParams(family, tuple(t.double() for t in params.tensors)), DistributionParams(family, tensors)
        ).sum()

    hessian = th.autograd.functional.hessian(total_kl, flat)
    u = th.randn(flat.shape, generator=th.Generator().manual_seed(4), dtype=th.float64)
    u_parts = tuple(c.view(s) for c, s in zip(th.split(u, sizes), shapes, strict=True))
    double_params = DistributionParams(family, tuple(t.double() for t in params.tensors))
    metric_u = th.cat([t.reshape(-1) for t in fisher_metric_product(double_params, u_parts)])
    th.testing.assert_close(metric_u, hessian @ u, rtol=1e-10, atol=1e-12)


def freeze_log_std(policy):
    policy.log_std.requires_grad_(False)


def freeze_mean(policy):
    """Everything the mean depends on frozen: only ``log_std`` is trained, and the mean has no gradient at all."""
    for module in (policy.features_extractor, policy.mlp_extractor.policy_net, policy.action_net):
        module.requires_grad_(False)


def freeze_extractor(policy):
    policy.mlp_extractor.policy_net.requires_grad_(False)


FROZEN = {
    "box-frozen-log-std": (ACTION_SPACES["box"], {}, freeze_log_std),
    "box-frozen-mean": (ACTION_SPACES["box"], {}, freeze_mean),
    "box-frozen-policy-net": (ACTION_SPACES["box"], {}, freeze_extractor),
    "gsde-frozen-log-std": (ACTION_SPACES["box"], {"use_sde": True}, freeze_log_std),
    "discrete-frozen-policy-net": (ACTION_SPACES["discrete"], {}, freeze_extractor),
}


@pytest.mark.parametrize("name", list(FROZEN))
def test_fisher_product_with_a_frozen_distribution_parameter_is_the_kl_hessian(name):
    """A distribution tensor that does not depend on the actor parameters has a zero Jacobian: it adds nothing to
    F = Jᵀ M J (it used to crash autograd: "element 1 of tensors does not require grad")."""
    space, kwargs, freeze = FROZEN[name]
    policy = tiny_policy(space, **kwargs)
    freeze(policy)
    obs, actions = sample_batch(policy, n=12)
    actor = ActorView(policy, obs)
    theta_old = actor.flat()
    _, implementations = products(actor, obs, actions, theta_old)
    with th.no_grad():
        old_torch = rebuilt_torch_dists(actor.evaluate(theta_old, obs, actions).params)

    def torch_mean_kl(theta):
        return reference_kl(old_torch, rebuilt_torch_dists(actor.evaluate(theta, obs, actions).params)).mean()

    hessian = th.autograd.functional.hessian(torch_mean_kl, theta_old)
    assert hessian.abs().max() > 1e-3, "degenerate test: the Hessian is (nearly) zero"
    v = th.randn(actor.size, generator=th.Generator().manual_seed(0))
    for label, product in implementations.items():
        th.testing.assert_close(
            product(v), hessian @ v + DAMPING * v, rtol=1e-4, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}"
        )


MLP_COVERED = {
    **{name: name in ACTION_SPACES for name in POLICIES},
    **{name: name in ("box-frozen-log-std",) for name in FROZEN},
}


@pytest.mark.parametrize("name", [*POLICIES, *FROZEN])
def test_the_written_out_mlp_product_covers_sb3s_mlp_actors_and_nothing_else(name):
    if name in POLICIES:
        space, kwargs = POLICIES[name]
        policy = tiny_policy(space, **kwargs)
    else:
        space, kwargs, freeze = FROZEN[name]
        policy = tiny_policy(space, **kwargs)
        freeze(policy)
    obs, _ = sample_batch(policy, n=12)
    assert (mlp_fisher_product(ActorView(policy, obs), obs, DAMPING) is not None) == MLP_COVERED[name]


@pytest.mark.parametrize("name", list(ACTION_SPACES))
@pytest.mark.parametrize(
    "policy_kwargs",
    [dict(net_arch=dict(pi=[32, 16, 8], vf=[4])), dict(net_arch=dict(pi=[12], vf=[4]), activation_fn=th.nn.ELU)],
    ids=["tanh-3-layers", "elu"],
)
def test_the_written_out_mlp_product_equals_autograds_on_deeper_networks(name, policy_kwargs):
    policy = tiny_policy(ACTION_SPACES[name], **policy_kwargs)
    obs, actions = sample_batch(policy, n=300)
    actor = ActorView(policy, obs)
    theta = actor.flat().requires_grad_(True)
    reference = JacobianFisherProduct(theta, actor.evaluate(theta, obs, actions).params, damping=DAMPING)
    written_out = mlp_fisher_product(actor, obs, DAMPING)
    assert written_out is not None
    generator = th.Generator().manual_seed(2)
    for _ in range(3):
        v = th.randn(actor.size, generator=generator)
        expected = reference(v)
        assert (expected - DAMPING * v).abs().max() > 1e-3  # F itself is not negligible next to the damping
        th.testing.assert_close(written_out(v), expected, rtol=1e-5, atol=1e-6)


def test_the_written_out_mlp_product_declines_hooks_and_trainable_extractors():
    policy = tiny_policy(ACTION_SPACES["box"])
    obs, _ = sample_batch(policy, n=8)
    policy.action_net.register_forward_hook(lambda module, inputs, output: output)
    assert mlp_fisher_product(ActorView(policy, obs), obs, DAMPING) is None
    cnn_like = tiny_policy(ACTION_SPACES["discrete"], features_extractor_class=ValueEmbedding)
    assert mlp_fisher_product(ActorView(cnn_like, obs), obs, DAMPING) is None
    # methods replaced on the instance, not the class: the written-out product would not compute what they do
    own_distribution = tiny_policy(ACTION_SPACES["box"])
    get_distribution = own_distribution.get_distribution
    own_distribution.get_distribution = lambda obs: get_distribution(obs)
    assert mlp_fisher_product(ActorView(own_distribution, obs), obs, DAMPING) is None
    own_layer = tiny_policy(ACTION_SPACES["box"])
    own_layer.action_net.forward = lambda x: th.nn.Linear.forward(own_layer.action_net, x) * 0.5
    assert mlp_fisher_product(ActorView(own_layer, obs), obs, DAMPING) is None


@pytest.mark.parametrize(
    "activation_fn",
    [partial(th.nn.LeakyReLU, negative_slope=-0.1), partial(th.nn.ELU, alpha=-0.5)],
    ids=["leaky-relu-negative-slope", "elu-negative-alpha"],
)
def test_activations_whose_derivative_the_output_does_not_tell_train_on_autograds_paths(activation_fn):
    """torch's backward from the output refuses a negative slope (the output's sign no longer tells the input's): the
    written-out Fisher product and critic step decline such layers, and training runs as sb3-contrib's does."""
    policy_kwargs = dict(net_arch=dict(pi=[8], vf=[8]), activation_fn=activation_fn)
    for name in ("box", "discrete"):
        policy = tiny_policy(ACTION_SPACES[name], **policy_kwargs)
        obs, _ = sample_batch(policy, n=8)
        assert mlp_fisher_product(ActorView(policy, obs), obs, DAMPING) is None
        actor_ids = {id(p) for p in ActorView(policy, obs).parameters}
        assert MlpCriticRegression.for_policy(policy, critic_parameters(policy, actor_ids), actor_ids) is None
        model = TRPO(
            "MlpPolicy",
            RandomEnv(BOX_OBS, ACTION_SPACES[name]),
            n_steps=64,
            batch_size=32,
            seed=0,
            policy_kwargs=policy_kwargs,
        )
        model.learn(128)
        assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
        assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())
