#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md and docs/example-report/, as they were run on the lent GPU machine
# (Python 3.12 with torch and pytorch-lightning preinstalled; the other packages carried as wheels in .whl/).
#   bash benchmarks/gpu_session.sh part1 OUTDIR   # GPU tests, update time, kernel census, act time, buffer and its
#                                                 # memory at 1M transitions, CPU and CUDA storage (one GPU)
#   bash benchmarks/gpu_session.sh sb3 OUTDIR     # lit_td3 vs SB3, side by side (one GPU)
#   bash benchmarks/gpu_session.sh sb3fast OUTDIR # the same, lit_td3 with model.cuda_graphs and a CUDA buffer
#   bash benchmarks/gpu_session.sh sync OUTDIR    # one env: async vs in-process (data.async_envs false), each vs SB3
#   bash benchmarks/gpu_session.sh scaling OUTDIR # 1 vs 8 async envs
#   bash benchmarks/gpu_session.sh scalingfast OUTDIR # the same with model.cuda_graphs and a CUDA buffer
#   bash benchmarks/gpu_session.sh corun OUTDIR   # one env, async vs in-process, alternating: the env's own step in each
#   bash benchmarks/gpu_session.sh ab OUTDIR      # the A/B validation runs and their report
#   bash benchmarks/gpu_session.sh ddp OUTDIR     # the DDP tests on NCCL, then 1 vs 2 GPUs (a machine with 2 GPUs)
#   bash benchmarks/gpu_session.sh render OUTDIR  # the embedded env vs gymnasium's renderer, then SB3 on each
#   bash benchmarks/gpu_session.sh builds OUTDIR OLDTREE [FLAGS...]  # this tree vs another build, alternating
#     rounds of env_scaling.py with FLAGS (default: one env, graphs, CUDA buffer); OLDTREE: an unpacked
#     `git archive REV`, inside this tree so that it travels to the GPU machine
set -uo pipefail
part=$1; out=$2; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export SDL_VIDEODRIVER=dummy PYTHONUNBUFFERED=1
run() { local name=$1; shift; echo "== $name: $*"; ( time "$@" ) > "$out/$name.txt" 2>&1; echo "   exit $? ($(tail -3 "$out/$name.txt" | tr '\n' ' '))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
case $part in
  part1)
    run pytest_gpu python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_clipping.py tests/test_buffer.py tests/test_buffer_memory.py tests/test_resume.py -k "gpu or cuda or GradScaler or graph or sync"
    run pytest_telemetry python3 -m pytest -q -p no:cacheprovider tests/test_telemetry.py tests/test_alerts.py
    run update_time python3 benchmarks/update_time.py --device cuda --paths pixel,state
    run update_time_cudnn python3 benchmarks/update_time.py --device cuda --paths pixel --variants graphs,graphs_bare \
      --repeats 3 --iterations 150 --cudnn-benchmark
    run kernels python3 benchmarks/kernels.py --variants graphs,graphs_bare --updates 20 --cudnn-benchmark
    run kernels_eager python3 benchmarks/kernels.py --variants trained,bare --updates 20
    run act_time python3 benchmarks/act_time.py --device cuda
    run buffer_quick python3 benchmarks/buffer.py --quick
    run buffer_memory python3 benchmarks/buffer.py --transitions 1000000 --memory-only
    ;;
  sb3)
    run compare_sb3 python3 benchmarks/compare_sb3.py --device cuda --repeats 3 --steps 600 --learning-starts 1000 --warmup-steps 100
    ;;
  sb3fast)
    run compare_sb3_fast python3 benchmarks/compare_sb3.py --device cuda --repeats 3 --steps 600 --learning-starts 1000 \
      --warmup-steps 100 --lit-arg=--model.cuda_graphs=true --lit-arg=--data.buffer_device=cuda
    ;;
  sync)
    fast="--lit-arg=--model.cuda_graphs=true --lit-arg=--data.buffer_device=cuda --lit-arg=--trainer.benchmark=true"
    flags="--device cuda --paths pixel --repeats 2 --steps 600 --learning-starts 1000 --warmup-steps 100 --update-iterations 20"
    run compare_sb3_async python3 benchmarks/compare_sb3.py $flags $fast
    run compare_sb3_in_process python3 benchmarks/compare_sb3.py $flags $fast --lit-arg=--data.async_envs=false
    ;;
  scaling)
    run env_scaling python3 benchmarks/env_scaling.py --device cuda --num-envs 1,8
    ;;
  scalingfast)
    run env_scaling_graphs python3 benchmarks/env_scaling.py --device cuda --num-envs 1,8 --repeats 2 --steps 2000 \
      --env-only-steps 100 --lit-arg=--model.cuda_graphs=true --lit-arg=--data.buffer_device=cuda
    ;;
  corun)
    run env_modes python3 benchmarks/env_scaling.py --device cuda --num-envs 1 --replay-ratio 1 --env-modes async,in-process \
      --repeats 3 --steps 700 --learning-starts 1000 --warmup-steps 100 --env-only-steps 300 \
      --lit-arg=--model.cuda_graphs=true --lit-arg=--data.buffer_device=cuda --lit-arg=--trainer.benchmark=true
    ;;
  ab)
    ab=runs/ab
    run ab_clipping_off python3 -m lit_td3 fit --config configs/td3.yaml --config configs/validation_5k.yaml \
      --model.gradient_clipping.enabled false --trainer.default_root_dir $ab/clipping_off --trainer.enable_progress_bar false
    run ab_clipping_on python3 -m lit_td3 fit --config configs/td3.yaml --config configs/validation_5k.yaml \
      --trainer.default_root_dir $ab/clipping_on --trainer.enable_progress_bar false
    run ab_compare python3 -m lit_td3.report compare --baseline $ab/clipping_off --candidate $ab/clipping_on \
      --output $ab/example-report
    tar czf "$out/ab_runs.tgz" --exclude='*.pt' --exclude='*.ckpt' $ab
    ;;
  ddp)
    run pytest_ddp_nccl python3 -m pytest -q -p no:cacheprovider tests/test_ddp.py -k gpu
    run ddp_scaling python3 benchmarks/ddp_scaling.py --devices 1,2
    ;;
  render)
    fast="--lit-arg=--model.cuda_graphs=true --lit-arg=--data.buffer_device=cuda --lit-arg=--trainer.benchmark=true"
    run car_racing_render python3 benchmarks/car_racing_render.py --repeats 3
    for env in CarRacing-v3 lit_td3/CarRacing-v3; do
      run "compare_sb3_${env//\//_}" python3 benchmarks/compare_sb3.py --device cuda --paths pixel --pixel-env "$env" \
        --repeats 2 --steps 600 --learning-starts 1000 --warmup-steps 100 $fast
    done
    ;;
  builds)
    old=$(cd "$3" && pwd); new=$PWD; out=$(cd "$out" && pwd)
    site=""; [ -d .whl ] && site=/tmp/site:  # each tree imports its own lit_td3, never the other's
    flags="--device cuda --num-envs 1 --replay-ratio 1 --repeats 1 --steps 1500 --learning-starts 500 --warmup-steps 200
      --env-only-steps 300 --lit-arg=--model.cuda_graphs=true --lit-arg=--data.buffer_device=cuda
      --lit-arg=--trainer.benchmark=true"
    [ $# -gt 3 ] && flags="--device cuda --repeats 1 ${*:4}"
    for round in 1 2 3 4; do
      trees="$old $new"; [ $((round % 2)) -eq 0 ] && trees="$new $old"
      for tree in $trees; do
        name=old; [ "$tree" = "$new" ] && name=new
        (cd "$tree" && PYTHONPATH="$site$tree" run "builds_${name}_$round" python3 \
          benchmarks/env_scaling.py $flags)
      done
    done
    ;;
esac
