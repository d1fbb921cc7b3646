"""TD3 on several devices: how the ranks keep one model, and how what each rank knows reaches rank 0.

Gradients: ``TD3DDPStrategy`` puts each trained network, actor and critic, in its own ``DistributedDataParallel``.
Rollout statistics and stream states are small Python objects (episode results, RNG states): they travel with
``torch.distributed.all_gather_object``, gathered, never averaged away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.strategies import (
    DDPStrategy,
    ParallelStrategy,
    Strategy,
    StrategyRegistry,
)
from pytorch_lightning.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher,
)
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from lit_td3.config import ConfigError, check
from lit_td3.graphs import capture_stream

if TYPE_CHECKING:
    import pytorch_lightning as pl

T = TypeVar("T")


class TD3DDPStrategy(DDPStrategy):
    """Lightning's DDP with one ``DistributedDataParallel`` per trained network instead of one around the module.

    Each TD3 backward goes through one network: the critic's loss gives the actor no gradient, and the actor's loss
    gives none to the critic, which it holds frozen. Around the whole module, DDP must then search every backward for
    unused parameters (``find_unused_parameters``), and that search ends each backward with a blocking copy of the
    used-parameter map from the GPU (``Reducer::finalize_bucket_dense``): a host sync per backward, where the CPU
    waits for the GPU and for the other ranks (CUDA's sync debug mode raises there on 2 GPUs). Wrapped on its own,
    each network has all of its parameters used in every backward it takes part in, so no search is needed, and its
    all-reduce overlaps its own backward: no update syncs the host (``tests/test_ddp.py``, on 2 GPUs).

    The target networks are in no wrapper: they move only by Polyak averaging of online weights that are the same on
    every rank, and are broadcast from rank 0 once, with everything else in the module, when training starts.
    """

    strategy_name = "td3_ddp"

    signal_vote: _SignalVote | None = None
    """With several processes: where the ranks agree to act on SIGTERM or SLURM's requeue signal; the rollout stream
    takes the vote after each env step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Lightning registers these on the one wrapper around the whole module (DDPStrategy._register_ddp_hooks),
        # which this strategy never builds: refused, rather than silently not applied.
        for name in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period"):
            check(f"trainer.strategy.{name}", kwargs.get(name), kwargs.get(name) is None,
                  "null: TD3DDPStrategy gives actor and critic each its own DistributedDataParallel, and Lightning "
                  "applies communication hooks and model averaging only to one wrapper around the whole module")
        super().__init__(*args, **kwargs)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.world_size > 1:  # before the Trainer registers its signal handlers, which read the notifier
            self.signal_vote = vote = _SignalVote(trainer)
            connector = trainer._signal_connector
            connector._sigterm_notifier_fn = vote.note_stop
            connector._slurm_sigusr_handler_fn = vote.note_requeue
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_broadcast  # the stream's vote replaces it

    def configure_ddp(self) -> None:
        module = self.lightning_module
        if not hasattr(module, "distribute"):
            raise TypeError(f"TD3DDPStrategy trains a lit_td3 TD3Module, not {type(module).__name__}")
        _sync_module_states(module)
        module.distribute(self._wrap)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):  # start_method spawn, fork or forkserver
            self._launcher = _NetworksReturningLauncher(self, start_method=self._start_method)

    def _wrap(self, network: Module) -> DistributedDataParallel:
        # On the stream of the updates, unlike DDPStrategy's side stream: DDP keeps the parameters' AccumulateGrad
        # nodes, made on the stream current here, and a mismatch costs every backward a cross-stream wait (PyTorch
        # warns so; Lightning issue #21567). Under model.cuda_graphs the updates run on the graphs' capture stream.
        # Gradients as views of DDP's all-reduce buckets, unless the strategy is given gradient_as_bucket_view=False:
        # DDP then copies no gradient back out of its buckets after the all-reduce, one kernel fewer per parameter
        # and backward (27 per pixel update; BENCHMARKS.md, "Several GPUs"). Clipping scales the views in place.
        kwargs = {"gradient_as_bucket_view": True, **self._ddp_kwargs}
        graphed = self.lightning_module.hparams.get("cuda_graphs") and self.root_device.type == "cuda"
        with torch.cuda.stream(capture_stream(self.root_device.index)) if graphed else contextlib.nullcontext():
            return DistributedDataParallel(network, device_ids=self.determine_ddp_device_ids(), **kwargs)

    def teardown(self) -> None:
        module = self.lightning_module
        if hasattr(module, "distribute"):
            module.distribute(None)
        super().teardown()


class _NetworksReturningLauncher(_MultiProcessingLauncher):
    """Lightning's launcher of ranks started by ``spawn``, ``fork`` or ``forkserver``, which also hands the TD3
    networks back to the main process.

    After the fit, Lightning loads rank 0's weights into the main process's module non-strictly. But the main process
    never ran ``setup``, where the networks are built from the env's spaces, so nothing would load, silently, and the
    module would come back from ``fit`` without networks. Rank 0 therefore also sends its observation shapes, action
    size and counters, and the main process builds the networks before Lightning loads the weights into them.
    """

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        module = trainer.lightning_module
        if trainer.state.fn == TrainerFn.FITTING:  # as Lightning, which sends weights only after a fit
            # Small: the pipe they travel through must not fill up before the main process reads it (Lightning sends
            # the weights through a file).
            extra["lit_td3"] = {"observation_shapes": dict(module.hparams.observation_shapes),
                                "action_dim": module.hparams.action_dim,
                                "counters": dataclasses.asdict(module.counters)}
        return extra

    def _recover_results_in_main_process(self, worker_output: Any, trainer: pl.Trainer) -> None:
        if "lit_td3" in worker_output.extra:
            trainer.lightning_module.restore_from_rank_zero(**worker_output.extra["lit_td3"])
        super()._recover_results_in_main_process(worker_output, trainer)


class _SignalVote:
    """SIGTERM and SLURM's requeue signal under DDP, acted on by all ranks together after the same env step.

    Lightning (2.6) acts on both inside its signal handlers, wherever the signal lands: for SIGTERM it broadcasts
    rank 0's flag (its PR #20825), and for SLURM's requeue signal (SIGUSR1, with ``auto_requeue``) it saves a
    checkpoint, whose state is gathered from all ranks. Such a collective can meet a different one on another rank (a
    gradient all-reduce, the guard's loss sum): a 2-rank fit sent SIGTERM deadlocked so (the requeue signal did not,
    in the one run tried). Lightning's loop also stops a rank on its own SIGTERM flag after a batch, where another
    rank may go on to the next one. Here the handlers only note a signal, and after every vector env step (where the
    rollout stream calls the vote, and every rank reaches it in lockstep) the ranks take the maximum of their notes: a
    signal to any rank (SLURM signals them all) acts on every rank at the same env step. SIGTERM stops them there,
    where ``EnvStepCheckpoint`` saves the state of all of them together; the requeue signal runs Lightning's own
    requeue there (its checkpoint, then ``scontrol requeue`` from rank 0), and training goes on.

    After the env step, not at a batch start (where Lightning broadcast its flag): SLURM's SIGTERM also kills the env
    workers, and a rank that had passed the batch start's vote before the signal then found their pipes broken in
    its env step, and failed alone while the others waited for it in a collective (exit 1 or a hang). The stream
    holds such an error back until the vote, which stops every rank.

    The vote is an all-reduce of CPU tensors in a gloo group of its own: it waits for the other ranks, not for any
    GPU work. Lightning's broadcast was a tensor on the training device, read back at once: under NCCL a host sync at
    every batch, waiting for the previous update's kernels as well (0.9 ms of a 12.9 ms batch on 2 GPUs;
    BENCHMARKS.md, "Where each rank's time goes").
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer, self.stop, self.requeue = trainer, False, 0  # requeue: the signal's number once received
        self._requeue = trainer._signal_connector._slurm_sigusr_handler_fn  # Lightning's, run here after a vote
        self._group = torch.distributed.new_group(backend="gloo")  # a collective: every rank's setup makes it

    # The handlers only set a flag: anything more (even a print, whose stream the interrupted code may be writing)
    # can fail wherever the signal lands.
    def note_stop(self, signum: int, frame: Any) -> None:
        self.stop = True

    def note_requeue(self, signum: int, frame: Any) -> None:
        self.requeue = signum

    def __call__(self) -> None:
        votes = torch.tensor([int(self.stop), self.requeue])
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, group=self._group)
        stop, requeue = votes.tolist()
        if stop or requeue:
            signal_, action = ("SIGTERM", "stop") if stop else ("the requeue signal", "requeue")
            print(f"lit_td3: rank {self.trainer.global_rank}: a rank received {signal_}; all ranks {action} at this "
                  "env step", file=sys.stderr)
        if requeue:
            self.requeue = 0
            self._requeue(requeue, None)
        if stop:
            self.trainer._signal_connector.received_sigterm = True
            raise SIGTERMException()


def _no_broadcast() -> None:
    """In place of Lightning's per-batch SIGTERM broadcast under DDP (``_SignalVote`` acts on the signal)."""


StrategyRegistry.register(TD3DDPStrategy.strategy_name, TD3DDPStrategy,
                          description="DDP with a DistributedDataParallel per TD3 network (lit_td3)")


def check_strategy(strategy: Strategy, setting: object = None) -> None:
    """Refuses a strategy of several processes other than ``TD3DDPStrategy``; ``setting``: how the config asked for it.

    Lightning's own DDP strategies, which ``trainer.strategy: auto`` picks for several devices, wrap the whole module:
    plain, they fail at the first update that leaves the actor without gradients; with ``find_unused_parameters``,
    they sync the host in every backward.
    """
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, TD3DDPStrategy):
        asked = type(strategy).__name__ if setting is None else f"{setting!r} ({type(strategy).__name__})"
        raise ConfigError(
            f"trainer.strategy={asked}: expected 'ddp' to train on several devices or nodes, which lit_td3 runs as its "
            f"TD3DDPStrategy ('{TD3DDPStrategy.strategy_name}'; from Python, Trainer(strategy=TD3DDPStrategy()))")


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all ranks, in a new tensor. A collective, queued on the GPU under NCCL; unlike Lightning's
    ``strategy.reduce``, which puts a barrier, and so a host sync, before every all-reduce."""
    summed = tensor.clone()
    torch.distributed.all_reduce(summed)
    return summed


def gather_from_ranks(trainer: pl.Trainer | None, obj: T) -> list[T]:
    """``obj`` of every rank, in rank order; ``[obj]`` in a single process.

    A collective: in a distributed run every rank must call it at the same point (the callers do so at env-step log
    points and checkpoints, which all ranks reach in lockstep).
    """
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
