"""Does lit_td3 learn? TD3 on Pendulum-v1 with the RL Zoo's settings, for several seeds, on the CPU.

RL Zoo (hyperparams/td3.yml, Pendulum-v1): 20,000 env steps, 400-300 MLPs, learning rate 1e-3, batch 256,
gamma 0.98, learning_starts 10,000, Gaussian exploration noise 0.1, buffer 200,000. Each seed runs the real CLI in a
subprocess and is judged on the mean deterministic return of 10 evaluation episodes at the end
(targets: >= -250 per seed, >= -200 on average; Stable-Baselines3 reached -115 for seed 0 on this kind of machine).

    python benchmarks/learning.py                 # seeds 0 1 2, as reported in the README
    python benchmarks/learning.py --seeds 0 --clipping on
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_td3.report import load_run


def rl_zoo_config(root: Path, seed: int, clipping: bool, total: int) -> dict:
    return {
        "seed_everything": seed,
        "trainer": {
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "callbacks.EnvStepCheckpoint", "init_args": {"every_n_env_steps": total}},
                {"class_path": "callbacks.EvaluationCallback", "init_args": {"every_n_env_steps": total}},
            ],
        },
        "model": {
            "gamma": 0.98, "actor_mlp_lr": 1e-3, "critic_mlp_lr": 1e-3,
            "network": {"hidden_sizes": [400, 300]},
            "gradient_clipping": {"enabled": clipping},
            "log_every_n_env_steps": 1000,
        },
        "data": {
            "env_id": "Pendulum-v1", "max_episode_steps": 200, "total_env_steps": total, "learning_starts": 10_000,
            "buffer_size": 200_000, "batch_size": 256, "exploration_noise": 0.1, "eval_episodes": 10,
            "seed": seed, "async_envs": False,
        },
    }


def run_seed(seed: int, clipping: bool, total: int, workdir: Path) -> tuple[float, float]:
    root = workdir / f"seed{seed}"
    config = workdir / f"seed{seed}.yaml"
    config.write_text(yaml.safe_dump(rl_zoo_config(root, seed, clipping, total)))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_td3", "fit", "--config", "configs/td3.yaml", "--config", str(config)],
                   cwd=REPO, check=True, env={**os.environ, "SDL_VIDEODRIVER": "dummy"},
                   stdout=subprocess.DEVNULL)
    evaluation = load_run(root)["eval/return"]
    return float(evaluation.values[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clipping", choices=["on", "off"], default="off",
                        help="gradient clipping (the RL Zoo and SB3 have none; default off to match)")
    parser.add_argument("--total-env-steps", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {seed: run_seed(seed, args.clipping == "on", args.total_env_steps, Path(tmp)) for seed in args.seeds}
    print(f"TD3 on Pendulum-v1, RL Zoo settings, {args.total_env_steps} env steps, clipping {args.clipping}, "
          f"mean return of 10 deterministic episodes at the end\n")
    print("| seed | eval return | target | wall s |\n| --- | --- | --- | --- |")
    for seed, (ret, wall) in results.items():
        print(f"| {seed} | {ret:.1f} | {'pass' if ret >= -250 else 'FAIL'} (>= -250) | {wall:.0f} |")
    mean = statistics.fmean(r for r, _ in results.values())
    print(f"| mean | {mean:.1f} | {'pass' if mean >= -200 else 'FAIL'} (>= -200) | |")


if __name__ == "__main__":
    main()
