"""benchmarks/ddp_profile.py: py-spy's collapsed stacks split into each rank's stages, as BENCHMARKS.md reports them.

A sample belongs to the rank whose process it was taken in, and to the first stage whose frame is on its stack; samples
outside a rank's training loop (imports, env workers, the launcher's threads) belong to none.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ddp_profile import STAGES, rank_stages

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "2xh200_ddp_profile"
RANK_0 = 'process 11:"python3 -m lit_td3 fit --trainer.devices 2"'
RANK_1 = 'process 12:"python3 -m lit_td3.__main__ fit --trainer.devices 2"'
LOOP = "_run_module_as_main (<frozen runpy>:198);_TrainingEpochLoop.run (training_epoch_loop.py:153)"


def test_samples_go_to_their_rank_and_to_the_first_stage_on_their_stack(tmp_path: Path) -> None:
    lines = [
        # the SIGTERM check is inside the loop's advance, and listed before the loop's catch-all stage; Lightning's
        # broadcast and lit_td3's vote that replaces it are one stage
        f"{RANK_0};{LOOP};_TrainingEpochLoop._broadcast_sigterm_tensor (x.py:265) 7",
        f"{RANK_0};{LOOP};_SignalVote.__call__ (distributed.py:170) 1",
        # clipping runs inside Adam's step (Lightning's closure): it is counted as clipping, not as the step
        f"{RANK_0};{LOOP};Adam.step (adam.py:227);TD3Module.on_before_optimizer_step (module.py:375) 5",
        f"{RANK_0};{LOOP};Adam.step (adam.py:227) 2",
        f"{RANK_0};{RANK_1};{LOOP};DistributedDataParallel.forward (distributed.py:1699) 3",
        f"{RANK_0};{RANK_1};{LOOP};LightningModule._call_batch_hook (module.py:351) 4",
        # outside any training loop: rank 0's imports, an env worker of rank 1
        f"{RANK_0};_run_module_as_main (<frozen runpy>:198);_find_and_load (<frozen importlib._bootstrap>:1360) 50",
        f'{RANK_0};{RANK_1};process 13:"python3 -c forkserver";_async_worker (vector.py:1) 40',
    ]
    raw = tmp_path / "devices_2.raw"
    raw.write_text("\n".join(lines) + "\n")
    stage = {marker: name for name, markers in STAGES for marker in markers}

    ranks = rank_stages(raw)
    assert set(ranks) == {RANK_0, RANK_1}
    assert ranks[RANK_0] == {stage["_SignalVote.__call__"]: 8,
                             stage["TD3Module.on_before_optimizer_step"]: 5, stage["Adam.step"]: 2}
    assert ranks[RANK_1] == {stage["DistributedDataParallel.forward"]: 3, stage["_TrainingEpochLoop.run"]: 4}


def test_the_kept_profiles_hold_one_rank_per_gpu() -> None:
    # the analysis BENCHMARKS.md quotes: one rank in the 1-GPU profile, two in the 2-GPU one, and DDP's forward only
    # where DDP ran
    ddp_forward = next(name for name, markers in STAGES if "DistributedDataParallel.forward" in markers)
    for devices in (1, 2):
        ranks = rank_stages(RESULTS / f"devices_{devices}.raw.gz")
        assert len(ranks) == devices
        assert all((samples[ddp_forward] > 0) == (devices == 2) for samples in ranks.values())
