#!/usr/bin/env bash
# The prepared GPU check: the gpu-marked tests and every gpu_* benchmark, in under 8 minutes, one JSON of figures.
#
#   scripts/device_check.sh --prepare   HERE, with the package registries: the wheels the GPU image lacks (diffusers,
#                                       deepspeed, imageio-ffmpeg and their missing needs, for its Python 3.12) and
#                                       the sample clips the checks read, into .device/ (git-ignored, ~45 MB).
#   scripts/device_check.sh             ON THE GPU MACHINE, e.g. the device tool's
#                                       run(carry=[".device"], command="scripts/device_check.sh", timeout_s=540):
#                                       installs .device/wheels (or, with no wheels and registry access, whatever
#                                       is missing, from the registries), runs the checks, writes
#                                       $OUT/device_check.json (or --out DIR) and exits 0 only if all passed.
#   scripts/device_check.sh --dry       anywhere (CPU): the same steps with this repo's .venv, at tiny sizes.
#
# Each part has its own time limit; a part that fails or times out is recorded in the JSON, the rest still run.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode=device
out="${OUT:-$root/device-check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) mode=dry ;;
    --prepare) mode=prepare ;;
    --out) out="$2"; shift ;;
    *) echo "usage: scripts/device_check.sh [--prepare | --dry] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

# what the GPU image (torch, transformers, opencv, pytest, tqdm... see the device library's KINDS.md) lacks
wheels=(diffusers==0.42.1 deepspeed==0.19.8 imageio-ffmpeg==0.6.0 hjson==3.1.0 pydantic==2.14.4
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 importlib_metadata==10.2.0)
samples=(sun.mp4 more/lp_d12.mp4)

if [ "$mode" = prepare ]; then
  py="$root/.venv/bin/python"
  rm -rf .device && mkdir -p .device/wheels .device/samples/more
  # deepspeed is published as source only: its pure-Python wheel is built here (ops are JIT-built where they run)
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .device/wheels "deepspeed==0.19.8" || exit 1
  others=()
  for w in "${wheels[@]}"; do [ "${w%%==*}" = deepspeed ] || others+=("$w"); done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels "${others[@]}" || exit 1
  src="${DUALFORCE_SAMPLES:-$root/../shared/samples}"
  for s in "${samples[@]}"; do cp "$src/$s" ".device/samples/$s" || exit 1; done
  du -sh .device
  echo "carry .device: run(carry=[\".device\"], command=\"scripts/device_check.sh\", timeout_s=540)"
  exit 0
fi

mkdir -p "$out"
log="$out/device_check.log"
: > "$log"
if [ "$mode" = dry ]; then
  bash scripts/bootstrap.sh >> "$log" 2>&1
  py="$root/.venv/bin/python"
  size=tiny; repeats=2
  # the limits below are the GPU machine's budget; on a CPU the same parts at tiny sizes run slower (gpu_extractors
  # 81-86 s for one repeat on the 2-core machine, 2026-12-07, old and new code alike), so the dry run allows 3x
  slack=3
  tests=(tests/test_flex_attention.py tests/test_streaming_cache.py tests/test_prefetch.py tests/test_gpu_extractors.py)
  marker=()
else
  py=python3
  size=real; repeats=3
  slack=1
  # only the modules holding gpu tests: the others import what the GPU image lacks (prefect, dlib, webdataset)
  mapfile -t tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
  marker=(-m gpu)
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  if [ -d .device/wheels ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site \
      .device/wheels/*.whl >> "$log" 2>&1 || { echo "installing .device/wheels failed (see $log)" >&2; exit 1; }
    export PYTHONPATH="/tmp/device-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    missing=()
    for pair in diffusers:diffusers deepspeed:deepspeed imageio_ffmpeg:imageio-ffmpeg; do
      "$py" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      "$py" -m pip install -q "${missing[@]}" >> "$log" 2>&1 || { echo "pip install ${missing[*]} failed" >&2; exit 1; }
    fi
  fi
  [ -d .device/samples ] && export DUALFORCE_SAMPLES="$root/.device/samples"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

timings=()
part() {  # part NAME LIMIT_SECONDS COMMAND...: run it, log it, remember its seconds and exit status
  local name="$1" limit="$(($2 * slack))"; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local status=$?
  timings+=("$name=$((SECONDS - start)):$status")
  echo "== $name: exit $status after $((SECONDS - start))s" | tee -a "$log"
}

part tests 120 "$py" -m pytest -q -p no:cacheprovider "${marker[@]}" --junitxml="$out/tests.xml" "${tests[@]}"
part gpu_attention 40 "$py" -m benchmarks.gpu_attention --size "$size" --repeats "$repeats" --json "$out/gpu_attention.json"
part gpu_train_step 150 "$py" -m benchmarks.gpu_train_step --size "$size" --repeats "$repeats" --json "$out/gpu_train_step.json"
part gpu_extractors 70 "$py" -m benchmarks.gpu_extractors --size "$size" --repeats "$repeats" --json "$out/gpu_extractors.json"
part gpu_streaming 60 "$py" -m benchmarks.gpu_streaming --size "$size" --repeats "$repeats" --json "$out/gpu_streaming.json"
"$py" -m benchmarks.device_report "$out" --mode "$mode" --timings "${timings[@]}" > /dev/null
status=$?
echo "figures: $out/device_check.json (complete: $([ $status = 0 ] && echo yes || echo no))"
exit $status
