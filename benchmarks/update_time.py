"""Milliseconds per TD3 update at batch 256, and what clipping + telemetry cost (GitHub issue "Performance", 3-4).

One "update" is one critic step plus 1/policy_freq of an actor step (with the target update), the unit of the
issue's targets; it is measured as the mean of each group of policy_freq consecutive batches, so that every group
holds exactly one actor step. Each variant runs ``TD3Module.training_step`` inside a real ``Trainer.fit`` (manual
optimization, ``on_before_optimizer_step``, callbacks) on a pool of random batches that already sit on the device,
and each batch is timed between ``on_train_batch_start`` and ``on_train_batch_end`` with ``torch.cuda.synchronize``
on both sides. Warm-up batches (allocator, cuDNN autotuning, ``torch.compile``) are not timed; variants take turns
for ``--repeats`` rounds so that drift hits them alike.

Variants (networks and hyperparameters from configs/td3.yaml):
- as trained: clipping, per-part gradient norms, the non-finite guard, and the gradient alerts callback;
- telemetry only: ``model.gradient_clipping.enabled: false``;
- bare: ``on_before_optimizer_step`` does nothing (no clipping, telemetry or guard) and no alerts callback;
  the cost of clipping + telemetry is as-trained minus bare;
- ``model.compile: true`` (as trained otherwise);
- ``model.cuda_graphs: true`` (CUDA only), as trained and bare: the cost of clipping + telemetry when the update is
  replayed as CUDA graphs;
- reference: the same networks, losses and optimizers in a plain PyTorch loop, without Lightning or telemetry.
  Its convolutions keep PyTorch's default NCHW layout; on the CPU a fit re-lays them channels_last
  (``TD3Module.setup``), so there the difference also holds what that layout gains.
- opt-in, ``plain_compile``: the plain loop with its losses, optimizer steps and target update compiled
  (``torch.compile``, compiled in the first round's warm-up): what compiled kernels make of the same update.
- opt-in, ``--variants trained,ddp,ddp_copies``: as trained under ``TD3DDPStrategy`` in one process (world size 1),
  as shipped and with ``gradient_as_bucket_view=False``: what DDP's wrappers, hooks and all-reduces add on the host,
  without a second rank to wait for.

On CUDA it also counts the host-device synchronizations one as-trained batch makes (eager and graphed), and where
they come from.

    python benchmarks/update_time.py --device cuda
    python benchmarks/update_time.py --device cpu --iterations 20 --repeats 2 --variants trained,bare

The script reports; it asserts no target.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from common import (
    REPO,
    STATE_HIDDEN_SIZES,
    Batches,
    Summary,
    base_config,
    check_device,
    collect,
    log,
    machine_line,
    markdown_table,
    per_update_ms,
    random_batches,
    require_at_least,
    run_line,
    script_parser,
    synchronize,
    time_updates,
    timed_callback_instances,
)

from lit_td3.buffer import Transition
from lit_td3.distributed import TD3DDPStrategy
from lit_td3.losses import actor_loss, critic_loss, smoothed_target_action, td_target
from lit_td3.module import GradientClipping, TD3Module
from lit_td3.networks import NetworkConfig

PATHS = {
    # observation shapes and action size of CarRacing-v3 and Pendulum-v1 under lit_td3's wrappers
    "pixel": ({"image": [4, 84, 84]}, 3),
    "state": ({"vector": [3]}, 1),
}
VARIANTS = {
    "trained": "as trained: clipping + telemetry + non-finite guard + gradient alerts",
    "telemetry": "telemetry only (gradient_clipping.enabled: false)",
    "bare": "bare: no clipping, no telemetry, no guard, no alerts",
    "compile": "model.compile: true, as trained otherwise",
    "graphs": "model.cuda_graphs: true, as trained otherwise",
    "graphs_bare": "model.cuda_graphs: true, bare",
    "plain": "reference: plain PyTorch loop, same networks/losses/optimizers, no Lightning",
    "plain_compile": "the plain loop with its losses, optimizer steps and target update through torch.compile",
    "ddp": "as trained, under TD3DDPStrategy in one process (its DDP wrappers and all-reduces, no second rank)",
    "ddp_copies": "as ddp, gradient_as_bucket_view=False (PyTorch's default: gradients copied out of DDP's buckets)",
}
OPT_IN = {"ddp", "ddp_copies", "plain_compile"}  # not in the default set: not clipping's cost


class BareTD3Module(TD3Module):
    """TD3Module whose optimizer steps skip clipping, gradient telemetry and the non-finite guard."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass


def module_kwargs(path: str) -> dict[str, Any]:
    """TD3Module arguments as configs/td3.yaml sets them (the state path gets the issue's 400-300 MLPs)."""
    model = dict(base_config()["model"])
    network = dict(model.pop("network"))
    if path == "state":
        network["hidden_sizes"] = list(STATE_HIDDEN_SIZES)
    clipping = GradientClipping(**model.pop("gradient_clipping"))
    shapes, action_dim = PATHS[path]
    return {**model, "network": NetworkConfig(**network), "gradient_clipping": clipping,
            "observation_shapes": shapes, "action_dim": action_dim}


def build(variant: str, path: str) -> TD3Module:
    kwargs = module_kwargs(path)
    if variant == "telemetry":
        kwargs["gradient_clipping"] = GradientClipping(**{**vars(kwargs["gradient_clipping"]), "enabled": False})
    if variant == "compile":
        kwargs["compile"] = True
    if variant.startswith("graphs"):
        kwargs["cuda_graphs"] = True
    cls = BareTD3Module if variant.endswith("bare") else TD3Module
    return cls(**kwargs)


def strategy_of(variant: str) -> TD3DDPStrategy | str:
    """The Trainer strategy a variant runs under: one process of TD3DDPStrategy for the ddp ones."""
    if variant == "ddp":
        return TD3DDPStrategy()
    if variant == "ddp_copies":
        return TD3DDPStrategy(gradient_as_bucket_view=False)
    return "auto"


# ---------------------------------------------------------------------------------------------------- timing
def lightning_round(module: TD3Module, variant: str, batches: list[Transition], device: str, iterations: int,
                    warmup: int, precision: Any) -> list[float]:
    callbacks = [] if variant.endswith("bare") else timed_callback_instances()
    policy_freq = module.hparams.policy_freq
    timer = time_updates(module, lambda i: batches[i % len(batches)], device=device,
                         iterations=iterations * policy_freq, warmup=warmup * policy_freq, callbacks=callbacks,
                         precision=precision, strategy=strategy_of(variant))
    return per_update_ms(timer.seconds, policy_freq)


class PlainLoop:
    """The TD3 update of ``TD3Module.training_step`` written as a plain PyTorch loop: the no-Lightning reference.

    With ``compiled``, everything between the backward passes goes through ``torch.compile`` (critic loss with its
    target, actor loss, both optimizer steps and the target update): how far compiled kernels take the same update.
    """

    def __init__(self, module: TD3Module, device: str, compiled: bool = False) -> None:
        self.m = module.to(device)
        self.actor_opt, self.critic_opt = module.configure_optimizers()  # the same optimizer kind and groups
        self.updates = 0
        self.targets = [p for net in (module.actor_target, module.critic_target) for p in net.parameters()]
        self.onlines = [p for net in (module.actor, module.critic) for p in net.parameters()]
        self.step_critic, self.step_actor = self.critic_opt.step, self.actor_opt.step
        if compiled:
            for name in ("critic_loss", "actor_loss", "update_targets"):
                setattr(self, name, torch.compile(getattr(self, name)))
            self.step_critic, self.step_actor = torch.compile(self.step_critic), torch.compile(self.step_actor)

    def critic_loss(self, batch: Transition, noise: torch.Tensor) -> torch.Tensor:
        m, hp = self.m, self.m.hparams
        with torch.no_grad():
            next_action = smoothed_target_action(m.actor_target(batch.next_obs), noise, hp.noise_clip)
            target = td_target(batch.reward, batch.terminated, *m.critic_target(batch.next_obs, next_action),
                               hp.gamma)
        return critic_loss(*m.critic(batch.obs, batch.action), target)[0]

    def actor_loss(self, batch: Transition) -> torch.Tensor:
        return actor_loss(self.m.critic.q1_value(batch.obs, self.m.actor(batch.obs)))

    @torch.no_grad()
    def update_targets(self) -> None:
        torch._foreach_lerp_(self.targets, self.onlines, self.m.hparams.tau)

    def step(self, batch: Transition) -> None:
        m, hp = self.m, self.m.hparams
        loss_q = self.critic_loss(batch, torch.randn_like(batch.action) * hp.policy_noise)
        self.critic_opt.zero_grad(set_to_none=True)
        loss_q.backward()
        self.step_critic()
        self.updates += 1
        if self.updates % hp.policy_freq == 0:
            m.critic.requires_grad_(False)
            loss_pi = self.actor_loss(batch)
            self.actor_opt.zero_grad(set_to_none=True)
            loss_pi.backward()
            self.step_actor()
            m.critic.requires_grad_(True)
            self.update_targets()


def plain_round(loop: PlainLoop, batches: list[Transition], device: str, iterations: int, warmup: int) -> list[float]:
    policy_freq = loop.m.hparams.policy_freq
    seconds = []
    for i in range((warmup + iterations) * policy_freq):
        synchronize(device)
        start = time.perf_counter()
        loop.step(batches[i % len(batches)])
        synchronize(device)
        if i >= warmup * policy_freq:
            seconds.append(time.perf_counter() - start)
    return per_update_ms(seconds, policy_freq)


# ---------------------------------------------------------------------------------------------------- syncs
class SyncWatch(pl.Callback):
    """Turns CUDA's sync debug mode on for the span of each batch (after the warm-up), so that every implicit
    host-device synchronization inside the update raises a warning that names its Python line."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.batches = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            torch.cuda.set_sync_debug_mode("default")
            self.batches += 1


def count_syncs(module: TD3Module, batches: list[Transition], warmup: int, count: int,
                precision: Any) -> tuple[float, list[str]]:
    """(syncs per batch, "file:line (n)" sources) of as-trained batches on CUDA."""
    watch = SyncWatch(warmup)
    loader = torch.utils.data.DataLoader(Batches(lambda i: batches[i % len(batches)], warmup + count),
                                         batch_size=None)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*timed_callback_instances(), watch])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=loader)
    torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sources = collections.Counter(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
    return len(syncs) / max(watch.batches, 1), [f"{where} ({n})" for where, n in sources.most_common()]


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, str(REPO) + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# ---------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--paths", default="pixel", help="comma-separated: pixel (4x84x84, NatureCNN), state "
                        "(Pendulum-v1 vector, 400-300 MLPs)")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all but "
                        "the ddp ones; on the CPU also not the graphs ones)")
    parser.add_argument("--iterations", type=int, default=200, help="timed updates per variant and round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed updates per variant and round "
                        "(the compile variant compiles in its first round's warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; variants take turns in each")
    parser.add_argument("--batch-size", type=int, default=base_config()["data"]["batch_size"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True, as "
                        "--trainer.benchmark true does in a run (cuDNN times its algorithms in the warm-up)")
    parser.add_argument("--matmul-precision", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision (default: torch's, 'highest')")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 10 timed updates, 3 warm-up, 2 rounds")
    args = parser.parse_args()
    args.paths = _subset(parser, "--paths", args.paths, PATHS)
    cpu_variants = [v for v in VARIANTS if not v.startswith("graphs")]
    default = [v for v in (VARIANTS if args.device == "cuda" else cpu_variants) if v not in OPT_IN]
    args.variants = _subset(parser, "--variants", args.variants or ",".join(default), VARIANTS)
    if args.device == "cpu" and set(args.variants) - set(cpu_variants):
        parser.error(f"--variants {','.join(args.variants)}: the graphs variants need --device cuda")
    if args.quick:
        args.iterations, args.warmup, args.repeats = 10, 3, 2
    require_at_least(parser, args, ("iterations", "repeats", "batch_size", "threads"), 1)
    if args.warmup < 1:
        parser.error(f"--warmup {args.warmup}: expected at least 1 (the first steps allocate optimizer state)")
    return args


def _subset(parser: argparse.ArgumentParser, flag: str, value: str, known: dict[str, Any]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        parser.error(f"{flag} {value}: expected a comma-separated subset of {','.join(known)}")
    return items


def measure_path(path: str, args: argparse.Namespace, precision: Any) -> tuple[list[str], dict[str, list[float]]]:
    torch.manual_seed(0)
    shapes, action_dim = PATHS[path]
    batches = random_batches(shapes, action_dim, args.batch_size, args.device)
    modules: dict[str, TD3Module] = {v: build(v, path) for v in args.variants if not v.startswith("plain")}
    plains = {v: PlainLoop(build("trained", path), args.device, compiled=v == "plain_compile")
              for v in args.variants if v.startswith("plain")}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.repeats):
        for variant in args.variants:
            log(f"[update_time] {path} round {r + 1}/{args.repeats}: {variant}")
            if variant in plains:
                times[variant] += plain_round(plains[variant], batches, args.device, args.iterations, args.warmup)
            else:
                times[variant] += lightning_round(modules[variant], variant, batches, args.device, args.iterations,
                                                  args.warmup, precision)
    syncs = []
    for variant in ("trained", "graphs"):
        if args.device == "cuda" and variant in args.variants:
            per_batch, sources = count_syncs(modules[variant], batches, args.warmup, 20, precision)
            syncs.append(f"Host-device synchronizations per batch, {VARIANTS[variant]} (CUDA sync debug mode, 20 "
                         f"batches): {per_batch:.2f}" + (f"; from {', '.join(sources)}" if sources else ""))
    del modules, plains
    collect()
    return syncs, times


def report(path: str, times: dict[str, list[float]], args: argparse.Namespace, syncs: list[str]) -> str:
    summaries = {v: Summary.of(t) for v, t in times.items()}
    rows = [[VARIANTS[v], s.text(2 if s.median < 100 else 1), s.count] for v, s in summaries.items()]
    lines = [f"### {path}: one TD3 update (critic + ½ actor), batch {args.batch_size}, {args.device}", "",
             markdown_table(["variant", "ms per update, median (min–max)", "updates timed"], rows), ""]
    for trained_name, bare_name, how in [("trained", "bare", "eager"), ("graphs", "graphs_bare", "CUDA graphs")]:
        if trained_name in summaries and bare_name in summaries:
            trained, bare = summaries[trained_name].median, summaries[bare_name].median
            lines.append(f"Clipping + telemetry, {how} (as trained − bare): {trained - bare:+.3f} ms per update, "
                         f"{100 * (trained - bare) / trained:+.1f}% of the as-trained update (issue target: ≤ 2%).")
    if "trained" in summaries and "plain" in summaries:
        trained, plain = summaries["trained"].median, summaries["plain"].median
        lines.append(f"Lightning + clipping + telemetry over the plain loop: {trained - plain:+.3f} ms per update "
                     f"({100 * (trained - plain) / trained:+.1f}% of the as-trained update).")
    if "plain" in summaries and "plain_compile" in summaries:
        speedup = summaries["plain"].median / summaries["plain_compile"].median
        lines.append(f"The plain loop compiled over eager: {speedup:.2f}× (above 1: compiled is faster).")
    for ddp in ("ddp", "ddp_copies"):
        if "trained" in summaries and ddp in summaries:
            trained, under_ddp = summaries["trained"].median, summaries[ddp].median
            lines.append(f"TD3DDPStrategy's own cost, one process ({ddp} − as trained): {under_ddp - trained:+.3f} ms "
                         f"per update ({100 * (under_ddp - trained) / under_ddp:+.1f}% of the update under DDP).")
    lines += [line + "." for line in syncs]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    precision = base_config()["trainer"].get("precision", "32-true")
    started = time.perf_counter()
    sections = []
    for path in args.paths:
        syncs, times = measure_path(path, args, precision)
        sections.append(report(path, times, args, syncs))
    print(f"## TD3 update time ({args.device}, precision {precision}, cudnn.benchmark {args.cudnn_benchmark}, "
          f"float32 matmul precision {torch.get_float32_matmul_precision()})\n")
    print("\n".join(sections))
    print(f"Each row pools {args.repeats} rounds of {args.iterations} timed updates after {args.warmup} untimed ones; "
          "an update is the mean of policy_freq consecutive batches. Batches are random and already on the device, "
          "so sampling and the host-to-device copy are not included.")
    print(f"\nCommand: python benchmarks/update_time.py {' '.join(sys.argv[1:])}. {run_line(started)}")
    print(machine_line(args.device))


if __name__ == "__main__":
    main()
