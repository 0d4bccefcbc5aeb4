#!/usr/bin/env bash
# The GPU checks in one command for an offline GPU machine: one that has torch + Triton + pytest
# but no package registry, and from which only what lands in $OUT comes back. Stages, in the order
# given (default: all):
#
#   validate   python -m fastgen validate: every kernel (every registered sampler's step too) against its
#              float64 reference on the GPU
#   static     python -m fastgen bench --static: the compiled sm_90 code of every variant validate
#              launches (registers, spills, vector widths, occupancy, H200 bound), beside the timings
#   compile    the torch.compile checks on CUDA first (tests/test_torch_compile.py: the captured fused
#              step beside torch.compile(mode="reduce-overhead") of the same step), apart from the suite
#   tests      pytest with the kernels compiled (the CUDA-graph and compile-cache tests run there)
#   steps      python bench/bench_samplers.py: one eager drop-in step of every sigma-space sampler
#              against diffusers' step (what a pipeline without torch.compile pays per step)
#   sampling   python bench/bench_sampling.py: the sampling-loop table (graph loop vs eager vs
#              diffusers vs model only, MLP and UNet, DDPM-1000 and DDIM-50)
#   report     python -m fastgen bench over every op family but sampling: results.json/.md/.csv
#
# Each stage has its own time limit (seconds, env VALIDATE_S / STATIC_S / COMPILE_S / TESTS_S / STEPS_S / SAMPLING_S / REPORT_S) so one slow stage
# cannot eat the call; logs and results are written under $OUT as they are produced.
# STEPS_ARGS, SAMPLING_ARGS and REPORT_ARGS narrow those three (say --samplers, --providers, --sizes) to
# fit a short GPU session.
#
# diffusers (the schedulers' base class and the peer rows) may be missing there: download its wheels
# on a machine that reaches the registry and copy the folder .whl/ along with the checkout:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata lazy-importer \
#       torchsde trampoline
#   bash bench/gpu_run.sh tests sampling        # on the GPU machine
#
# What the stages took on an H200 (16 cores, xdist with 12-15 workers, 2026-12-04): the suite about
# 300 s (the Triton compiles of a fresh machine dominate; the distributed tests are the slowest file),
# validate about 150 s, the sampling table narrowed to one size per model about 90 s, the report at
# one size and dtype about 60 s. The static stage needs no GPU: run it on any machine. To fit a
# 15-minute GPU session, split the stages over two calls, e.g. `validate compile tests` and `sampling report`
# with SAMPLING_ARGS / REPORT_ARGS as in bench/results/2026-12-04_H200_tests.md.
#
# Then commit $OUT's results under bench/results/ (bench/results/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# fastgen itself, offline (its dependencies are on the machine already)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib.util, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("diffusers", "present" if importlib.util.find_spec("diffusers") else "missing (no peer rows, scheduler tests fail)")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>&1 | tee -a "$OUT/env.txt"

status=0
for stage in "${@:-validate static compile tests steps sampling report}"; do
  for s in $stage; do
    case "$s" in
      static)
        timeout "${STATIC_S:-600}" python3 -m fastgen bench --static --out "$OUT/static" 2>&1 \
          | tee "$OUT/static.log" || status=1 ;;
      validate)
        # one family at a time, so a stage cut off by its limit keeps the tables of the families done
        # (and a failing family does not stop the next)
        families=$(python3 -c "from fastgen import validate; print(' '.join(validate.CHECKS))")
        timeout "${VALIDATE_S:-300}" bash -c "failed=0; for f in $families; do python3 -m fastgen validate --ops \$f || failed=1; done; exit \$failed" \
          2>&1 | tee "$OUT/validate.log" || status=1 ;;
      compile)
        timeout "${COMPILE_S:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_torch_compile.py -k cuda 2>&1 \
          | tee "$OUT/compile.log" || status=1 ;;
      tests)
        # every failure, not the first (a first run on a new device): one line per test as it ends, so
        # a stage cut off by its limit still says what passed; spread over the cores where xdist is there
        # (one file per worker: a file's compiled graphs are shared by its tests), each test capped
        parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-12} --dist loadfile")
        per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${TEST_TIMEOUT_S:-180}")
        eval "pytest_args=(${PYTEST_ARGS:-})"  # e.g. --tb=line; FASTGEN_TEST_IDS=<file> runs only those ids
        timeout "${TESTS_S:-420}" python3 -m pytest -v -rfE -p no:cacheprovider $parallel $per_test "${pytest_args[@]}" 2>&1 \
          | tee "$OUT/pytest.log" || status=1 ;;
      steps)
        eval "steps_args=(${STEPS_ARGS:-})"
        timeout "${STEPS_S:-300}" python3 bench/bench_samplers.py "${steps_args[@]}" 2>&1 \
          | tee "$OUT/steps.md" || status=1 ;;
      sampling)
        eval "sampling_args=(${SAMPLING_ARGS:-})"  # provider names hold spaces: quote them in SAMPLING_ARGS
        timeout "${SAMPLING_S:-420}" python3 bench/bench_sampling.py --reps 3 "${sampling_args[@]}" 2>&1 \
          | tee "$OUT/sampling.md" || status=1 ;;
      report)
        ops=$(python3 -c "from fastgen.bench import registry; print(' '.join(n for n, o in registry.load_all().items() if o.family != 'sampling'))")
        eval "report_args=(${REPORT_ARGS:-})"
        timeout "${REPORT_S:-540}" python3 -m fastgen bench --ops $ops --out "$OUT/report" --no-plots --no-progress \
          "${report_args[@]}" 2>&1 \
          | tee "$OUT/report.log" || status=1 ;;
      *) echo "unknown stage $s (validate, static, compile, tests, steps, sampling, report)"; status=2 ;;
    esac
  done
done
exit $status
