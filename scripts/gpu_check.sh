#!/usr/bin/env bash
# The GPU checks as one command, for a machine with an NVIDIA GPU whose python3
# holds a CUDA build of PyTorch (nothing is installed: the engine runs from src/).
#
# Run from a checkout:   bash scripts/gpu_check.sh     (about 9 minutes at most)
#
# It writes into $OUT (default: gpu_check_out/):
#   gpu.txt      the GPU, driver, torch and CUDA versions
#   pytest.txt   tests/torchbragg/test_cuda.py (golden parity on the GPU, fallback maps, taps,
#                the eager fallback) and test_gpu_kernel.py (host build, NVRTC compiles)
#   timing.txt   the 4096² tap configuration: kernel alone, whole render, per-kernel profile
#   bench.txt, bench/<STAMP>/bench.json   torchbragg bench --device cuda (cold and warm)
# The C program's images come from .golden/ when it holds a copy of ../shared/golden
# (cp -r ../shared/golden .golden), else from the small copies in tests/data. Keep the
# bench record by copying bench/<STAMP>/bench.json into reports/benchmarks/<STAMP>/.
# Each step has its own time limit (tests 200 s, timing 90 s, bench 240 s), so one slow
# step cannot take the others' results with it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHBRAGG_CACHE_DIR=${TORCHBRAGG_CACHE_DIR:-/tmp/torchbragg-kernels}
[ -f .golden/cases.json ] && export TORCHBRAGG_GOLDEN="$PWD/.golden"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

timeout "${GPU_CHECK_TEST_S:-200}" $PY -m pytest -q -rs tests/torchbragg/test_cuda.py tests/torchbragg/test_gpu_kernel.py \
  2>&1 | tail -n 60 | tee "$OUT/pytest.txt"

timeout 90 $PY - <<'PYEOF' 2>&1 | tee "$OUT/timing.txt"
import time, torch, torchbragg
args = torchbragg.TAP_CONFIG_ARGS
for dtype in (torch.float32, torch.float64):
    t0 = time.perf_counter()
    sim = torchbragg.Simulation.from_args(args, device="cuda", dtype=dtype)
    image = sim.render(); torch.cuda.synchronize()
    print(f"{dtype}: set-up + first render {time.perf_counter() - t0:.3f}s, plan {type(sim.compiled_plan()).__name__}")
    plan = sim.compiled_plan()
    ny, nx = sim.shape
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for label, fn in (("kernel alone", lambda: plan.run(0, ny, 0, nx, image, stats=False)),
                      ("render()", lambda: sim.render())):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            t0 = time.perf_counter(); start.record(); fn(); end.record(); torch.cuda.synchronize()
            times.append((time.perf_counter() - t0, start.elapsed_time(end) / 1e3))
        print(f"  {label}: wall min {1e3 * min(t[0] for t in times):.3f} ms, events min "
              f"{1e3 * min(t[1] for t in times):.3f} ms")
    print(f"  centre {float(sim.render()[2048, 2048]):.7f}, sum {float(sim.render().double().sum()):.6g}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            sim.render()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
PYEOF

timeout 240 $PY -m torchbragg bench --device cuda --configs tap4096,defaultF4096 --dtype both --repeats 20 \
  --no-tap-process --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
