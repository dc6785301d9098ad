"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def float64_observations(monkeypatch):
    """SB3's preprocessing turns Box observations into float32; these tests run the policy in float64 throughout."""
    import stable_baselines3.common.policies

    monkeypatch.setattr(stable_baselines3.common.policies, "preprocess_obs", lambda obs, space, normalize_images=True: obs)
