#!/usr/bin/env bash
# The prepared GPU run: one device call of at most 8 minutes (bench/README.md, "The GPU run").
#
#   bench/gpu_check.sh [--dry-run] OUT_DIR        (or GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh OUT_DIR)
#
# From the repository root or anywhere; writes at most 8 flat files into OUT_DIR:
#   gpu_check.log   everything printed, every stage
#   env.json        device, versions, revision, peers, and each stage's exit code, seconds and budget
#   tests.xml       JUnit report of the CUDA tests (tests/renderers --device cuda, interpreter off)
#   kernels.json    bench/bench_kernels.py (do_bench medians, launch-configuration grid, gather ceiling)
#   drr.json        the DRR suite, BENCH_PROFILE=gpu (pytest-benchmark JSON, peers side by side)
#   accuracy.json   bench/accuracy.py, same profile
#   skipping.json   bench/skipping.py: every renderer with empty-space skipping on and off
# Then, where the files come back: python bench/gpu_ingest.py FILES_DIR.
#
# Each stage runs under `timeout` with its own budget (seconds; environment overrides below),
# interrupted with SIGINT first (pytest then still writes its JSON), killed 10 s later; the next
# stage runs whatever happened. Budgets sum to 415 s, 475 s if every stage needs its 10 s of
# grace: under 8 min.
#   GPU_CHECK_BUDGET_SETUP=35 _TESTS=65 _KERNELS=100 _DRR=150 _ACCURACY=35 _SKIPPING=30
# The dry run (--dry-run) does every stage on CPU with tiny sizes under TRITON_INTERPRET=1 and
# installs nothing (PYTHONPATH=repository): on the GPU the only unknown is the GPU.
# Other variables: PYTHON (python3), PEERS_DIR (.peers; "none" runs without peers),
# GPU_CHECK_REVISION (file with `git describe --always --dirty` and the commit; default
# $PEERS_DIR/REVISION, written by `make gpu-prepare`; git itself is used where the tree is a checkout),
# GPU_CHECK_PYTEST_ARGS (replaces the CUDA tests' selection), GPU_CHECK_STAGES (default
# "setup tests kernels drr accuracy skipping").
set -uo pipefail

dry=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
PY=${PYTHON:-python3}
peers=${PEERS_DIR:-.peers}
stages=${GPU_CHECK_STAGES:-setup tests kernels drr accuracy skipping}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TRITONDRR_COMPILE=0

if [ "$dry" = 1 ]; then
    export TRITON_INTERPRET=1
    device=cpu
    profile=dry
    kernel_size=dry
    skip_size=dry
else
    export TRITON_INTERPRET=0
    device=cuda
    profile=gpu
    kernel_size=gpu
    skip_size=gpu
fi
: > "$work/stages.tsv"
t_start=$(date +%s)
echo "gpu_check: $(date -u +%FT%TZ) dry_run=$dry device=$device profile=$profile out=$out"

# stage NAME BUDGET_S COMMAND...: run under timeout, record exit code and seconds.
stage() {
    local name=$1 budget=$2
    shift 2
    case " $stages " in *" $name "*) ;; *) printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$budget" >> "$work/stages.tsv"; return 0 ;; esac
    echo
    echo "=== stage $name (budget ${budget}s) $(date -u +%T) ==="
    local t0 rc
    t0=$(date +%s)
    timeout -s INT -k 10 "$budget" "$@"
    rc=$?
    local seconds=$(( $(date +%s) - t0 ))
    [ $rc -eq 124 ] && echo "=== stage $name: stopped at its ${budget}s budget ==="
    echo "=== stage $name: exit $rc after ${seconds}s ==="
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$budget" >> "$work/stages.tsv"
    return 0
}

# -- setup: the peers' wheels, pynrrd, the project --------------------------------------------
setup() {
    local site="$work/site"
    if [ "$dry" != 1 ] && [ ! -e tritondrr/kernels ] && [ -d kernels ]; then
        # The package maps tritondrr.kernels to kernels/ (pyproject); the copy on the device has no
        # link, and the tests import tritondrr from the tree.
        ln -s ../kernels tritondrr/kernels
    fi
    if [ "$peers" != none ] && compgen -G "$peers/*.whl" > /dev/null; then
        mkdir -p "$site"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$peers"/*.whl; then
            echo "peers: installed $(ls "$peers"/*.whl | wc -l) wheels from $peers into $site"
            echo "installed" > "$work/peers"
        else
            echo "peers: pip install from $peers failed: running without peers"
            echo "install failed" > "$work/peers"
        fi
    else
        echo "peers: no wheels in '$peers' (make bench-wheels / make gpu-prepare, carry .peers): running without peers"
        echo "absent" > "$work/peers"
    fi
    if [ "$dry" = 1 ]; then
        echo "project: dry run, not installed (PYTHONPATH=$repo)"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
            || echo "project: pip install -e . failed; PYTHONPATH=$repo carries on"
    fi
    "$PY" - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import tritondrr, tritondrr.kernels
print("tritondrr from", tritondrr.__file__, "kernels from", tritondrr.kernels.__file__)
PY
}
peers_path="$work/site"
[ "$peers" != none ] && peers_path="$peers_path:$repo/$peers/stub"
export PYTHONPATH="$repo:$peers_path${PYTHONPATH:+:$PYTHONPATH}"
revision=${GPU_CHECK_REVISION:-$peers/REVISION}
[ -f "$revision" ] && export BENCH_GIT_REVISION="$repo/$revision"
if [ "$dry" = 1 ]; then
    echo "revision: $(git describe --always --dirty 2>/dev/null || cat "$revision" 2>/dev/null || echo unknown)"
fi

export -f setup
export work peers dry PY repo
stage setup "${GPU_CHECK_BUDGET_SETUP:-35}" bash -c setup
[ -f "$work/peers" ] || echo "not run" > "$work/peers"

# -- correctness first: the CUDA tests ----------------------------------------------------------
if [ -n "${GPU_CHECK_PYTEST_ARGS:-}" ]; then
    read -r -a test_args <<< "$GPU_CHECK_PYTEST_ARGS"
elif [ "$dry" = 1 ]; then
    test_args=(tests/renderers/trilinear/test_trilinear_triton.py -k "tiny_matches_reference")
else
    # The CPU-only test files would spend the window compiling CPU code, and the torch.compile
    # test ~30 s in inductor: left out (GPU_CHECK_PYTEST_ARGS runs them when there is time).
    test_args=(tests/renderers --ignore-glob='*_cpu.py' -k "not torch_compile")
fi
stage tests "${GPU_CHECK_BUDGET_TESTS:-65}" "$PY" -m pytest "${test_args[@]}" --device "$device" -q \
    -p no:cacheprovider --durations=10 --junitxml="$out/tests.xml"

# -- kernel-level benchmark ----------------------------------------------------------------------
stage kernels "${GPU_CHECK_BUDGET_KERNELS:-100}" "$PY" bench/bench_kernels.py --size "$kernel_size" \
    --device "$device" --out "$out/kernels.json"

# -- the DRR suite, peers side by side ------------------------------------------------------------
stage drr "${GPU_CHECK_BUDGET_DRR:-150}" env BENCH_PROFILE="$profile" "$PY" -m pytest bench/test_bench.py \
    --bench-device "$device" -q -p no:cacheprovider --benchmark-json="$out/drr.json" \
    --benchmark-columns=median,min,max,rounds --benchmark-sort=name

# -- accuracy against the exact integral, apart from the timings -------------------------------
stage accuracy "${GPU_CHECK_BUDGET_ACCURACY:-35}" env BENCH_PROFILE="$profile" "$PY" bench/accuracy.py \
    --device "$device" --json "$out/accuracy.json"

# -- what empty-space skipping gains, every renderer, on and off in the same run -----------------
stage skipping "${GPU_CHECK_BUDGET_SKIPPING:-30}" "$PY" bench/skipping.py --device "$device" --size "$skip_size" \
    --json "$out/skipping.json"

# -- env.json: what ran where, and how each stage ended ------------------------------------------
GPU_CHECK_WORK=$work GPU_CHECK_OUT=$out GPU_CHECK_DRY=$dry GPU_CHECK_T0=$t_start "$PY" - <<'PY'
import json, os, platform, subprocess, time
work, out = os.environ["GPU_CHECK_WORK"], os.environ["GPU_CHECK_OUT"]
stages = []
with open(os.path.join(work, "stages.tsv")) as f:
    for line in f:
        name, rc, seconds, budget = line.rstrip("\n").split("\t")
        status = "skipped" if rc == "skipped" else ("ok" if rc == "0" else ("timeout" if rc == "124" else f"exit {rc}"))
        stages.append({"name": name, "status": status, "exit": None if rc == "skipped" else int(rc),
                       "seconds": int(seconds), "budget_s": int(budget)})
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
env = {"dry_run": os.environ["GPU_CHECK_DRY"] == "1", "datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "seconds": int(time.time()) - int(os.environ["GPU_CHECK_T0"]), "python": platform.python_version(),
       "peers": open(os.path.join(work, "peers")).read().strip(), "stages": stages,
       "nvidia_smi": run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                         "--format=csv,noheader")}
try:
    import torch, triton
    env["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
except Exception as e:  # noqa: BLE001
    env["versions"] = {"error": str(e)}
try:
    import sys
    sys.path.insert(0, "bench")
    import drrbench
    env["git"] = drrbench.git_state()
except Exception as e:  # noqa: BLE001
    env["git"] = {"error": str(e)}
with open(os.path.join(out, "env.json"), "w") as f:
    json.dump(env, f, indent=1)
print()
print(f"{'stage':10s} {'status':10s} {'seconds':>8s} {'budget':>7s}")
for s in stages:
    print(f"{s['name']:10s} {s['status']:10s} {s['seconds']:8d} {s['budget_s']:7d}")
print(f"revision {env['git'].get('describe')}  peers {env['peers']}  total {env['seconds']} s")
PY
echo "files in $out:"
ls -la "$out"
