"""A training script that survives being killed, as the documentation shows it (run by tests/test_resume.py).

    python tests/resumable_script.py CHECKPOINT_FOLDER BUDGET

Each run continues from the latest checkpoint in CHECKPOINT_FOLDER, if any, to BUDGET timesteps, then saves
CHECKPOINT_FOLDER/final.zip.
"""

import sys
from pathlib import Path

from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tests.cli_envs.doomed  # noqa: F401  (registers CliDoomed-v0, which kills this process once)
from sb3_trpo import TRPO, load_latest_checkpoint

folder, budget = Path(sys.argv[1]), int(sys.argv[2])
env = make_vec_env("CliDoomed-v0", n_envs=2)
model = load_latest_checkpoint(folder, env)
if model is None:
    print("started from scratch")
    model = TRPO("MlpPolicy", VecNormalize(env), n_steps=16, batch_size=16, n_critic_updates=2, seed=0)
else:
    print(f"resumed at {model.num_timesteps} timesteps")
# save_freq is counted in calls (of n_envs steps each): a multiple of n_steps saves at the end of a rollout
checkpoints = CheckpointCallback(save_freq=64, save_path=str(folder), save_vecnormalize=True)
model.learn(budget - model.num_timesteps, callback=checkpoints, reset_num_timesteps=False)
model.save(folder / "final")
