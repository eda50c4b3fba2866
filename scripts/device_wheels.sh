#!/usr/bin/env bash
# The Python 3.12 wheels a GPU machine without network needs to run rf_jax, downloaded here
# (where there is a network) into an ignored folder that travels with the checkout.
#
#   bash scripts/device_wheels.sh           # download into device_wheels/, print the sizes
#   bash scripts/device_wheels.sh --list    # print what it would download (no network)
#   bash scripts/device_wheels.sh --check   # sizes of the folder as it is (no network)
#
# The machine it is for (DESIGN.md section 6) has Python 3.12, jax/jaxlib 0.11 (CUDA 13), flax,
# optax, orbax-checkpoint, tifffile, torch, torchvision and tensorboard, and no network. What
# rf_jax imports at run time beyond those is below, pinned to the versions the test suite runs
# (a `--config demo` run, `--mode evaluate` and scripts/benchmark.py, their imports listed
# with sys.modules):
#   missing  absent there: tensorflow-datasets and what it imports at run time (it declares
#            more: pyarrow, requests, simple_parsing, termcolor, psutil are not imported),
#            array_record, clu, ml-collections, tensorboardX;
#   maybe    imported by rf_jax but not in that machine's list (matplotlib for the report,
#            tqdm, safetensors for --mode export, setuptools for `pip install -e .`);
#   fallback protobuf: installed there only if the machine's own protobuf cannot load the
#            generated code of tensorflow-metadata.
# scripts/device_check.sh installs only the wheels whose distribution that machine lacks.
# Wheels are for CPython 3.12 on manylinux_2_27 x86_64 or older (jaxlib 0.11's own floor);
# promise is published as a source archive only: its pure-Python wheel is built here.
#
# Env: WHEELS_DIR (device_wheels), WHEELS_PYTHON_VERSION (3.12), WHEELS_PLATFORM
# (manylinux_2_27_x86_64), WHEELS_LIMIT_MIB (64: what may be carried along), PYTHON (python3:
# the pip that downloads).
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS_DIR=${WHEELS_DIR:-device_wheels}
PY_VERSION=${WHEELS_PYTHON_VERSION:-3.12}
PLATFORM=${WHEELS_PLATFORM:-manylinux_2_27_x86_64}
LIMIT_MIB=${WHEELS_LIMIT_MIB:-64}
PYTHON=${PYTHON:-python3}

# group  requirement
REQUIREMENTS="
missing tensorflow-datasets==4.9.10
missing tensorflow-metadata==1.21.0
missing googleapis-common-protos==1.76.0
missing array_record==0.8.6
missing dm-tree==0.1.10
missing immutabledict==4.3.1
missing promise==2.3
missing toml==0.10.2
missing importlib_resources==7.1.0
missing wrapt==2.5.2
missing clu==0.0.12
missing ml_collections==1.1.0
missing tensorboardX==2.6.5
maybe matplotlib==3.11.2
maybe contourpy==1.3.3
maybe cycler==0.12.1
maybe fonttools==4.68.0
maybe kiwisolver==1.5.1
maybe pyparsing==3.3.3
maybe python-dateutil==4.0.0
maybe six==1.17.0
maybe tqdm==4.70.1
maybe safetensors==0.8.0
maybe setuptools==84.2.1
fallback protobuf==7.36.2
"
SOURCE_ONLY="promise"  # no wheel on PyPI: built here (pure Python)

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

check_sizes() {
  # Prints each wheel's size and the total; fails above the limit or on an empty folder.
  local total=0 size name count=0
  if [[ ! -d "$WHEELS_DIR" ]]; then
    echo "error: no folder $WHEELS_DIR: run bash scripts/device_wheels.sh first" >&2
    return 1
  fi
  for path in "$WHEELS_DIR"/*.whl; do
    [[ -e "$path" ]] || continue
    size=$(stat -c %s "$path")
    name=$(basename "$path")
    printf '%9.2f MiB  %s\n' "$(awk -v s="$size" 'BEGIN{print s/1048576}')" "$name"
    total=$((total + size))
    count=$((count + 1))
  done
  if ((count == 0)); then
    echo "error: no wheels in $WHEELS_DIR" >&2
    return 1
  fi
  printf '%9.2f MiB  total, %d wheels in %s (limit %s MiB)\n' \
    "$(awk -v s="$total" 'BEGIN{print s/1048576}')" "$count" "$WHEELS_DIR" "$LIMIT_MIB"
  if ((total > LIMIT_MIB * 1048576)); then
    echo "error: the wheels take more than ${LIMIT_MIB} MiB" >&2
    return 1
  fi
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --list)
    echo "$REQUIREMENTS" | awk 'NF == 2 {printf "%-9s %s\n", $1, $2}'
    echo "for CPython $PY_VERSION, $PLATFORM (and older manylinux), into $WHEELS_DIR"
    exit 0 ;;
  --check) check_sizes; exit $? ;;
  '') ;;
  *) echo "error: unknown argument $1 (--list, --check or none)" >&2; exit 2 ;;
esac

# pip takes each --platform literally: name every manylinux tag down to the oldest.
rest=${PLATFORM#manylinux_2_}  # 27_x86_64
glibc_minor=${rest%%_*}
arch=${rest#*_}
if [[ "$PLATFORM" != manylinux_2_* || ! "$glibc_minor" =~ ^[0-9]+$ ]]; then
  echo "error: WHEELS_PLATFORM=$PLATFORM is not manylinux_2_<minor>_<arch>" >&2
  exit 2
fi
platforms=()
for ((minor = glibc_minor; minor >= 5; minor--)); do
  platforms+=(--platform "manylinux_2_${minor}_${arch}")
done
platforms+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}" \
            --platform "manylinux1_${arch}")

mkdir -p "$WHEELS_DIR"
rm -f "$WHEELS_DIR"/*.whl
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
while read -r group requirement; do
  [[ -n "${requirement:-}" ]] || continue
  name=${requirement%%==*}
  if [[ " $SOURCE_ONLY " == *" $name "* ]]; then
    "$PYTHON" -m pip wheel --quiet --no-deps --no-binary=:all: --wheel-dir "$build" "$requirement"
    cp "$build"/*.whl "$WHEELS_DIR"/
    rm -f "$build"/*.whl
  else
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" \
      --dest "$WHEELS_DIR" "$requirement"
  fi
  echo "$group $requirement"
done <<< "$REQUIREMENTS"
check_sizes
