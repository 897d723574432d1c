#!/usr/bin/env bash
# Wheels for bench/gpu.py on a GPU machine without network access (Python 3.12, x86-64 Linux):
# the packages its image lacks (trl, datasets and their own needs, pydantic), and transformers
# at the version sftlab is tested with (the image's is older). Pure-Python wheels and manylinux
# builds only, no dependencies resolved (--no-deps): each one needed is named here.
#
#   bash bench/gpu_wheels.sh                 # ~18 MB into .whl/ (ignored by git)
#   bash bench/gpu_wheels.sh --with-pyarrow  # also pyarrow (~45 MB), where the image's is older than datasets needs
#   bash bench/gpu_wheels.sh --with-liger    # also liger-kernel, to measure training.use_liger_kernel
#
# Then, on the GPU machine, with .whl carried next to the working tree (bench/gpu.py's docstring):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions from constraints.txt, the ones the tests pass with.
pin() { grep -E "^$1==" constraints.txt | head -1; }
packages=(
    "$(pin transformers)" "$(pin trl)" "$(pin datasets)" "$(pin pydantic)"
    pydantic-core==2.50.4 annotated-types==0.7.0 typing-inspection==0.4.5  # pydantic's own needs
    dill==0.4.1 multiprocess==0.70.19                                       # datasets' needs missing there
)
for option in "$@"; do
    case "$option" in
        --with-pyarrow) packages+=("$(pin pyarrow)") ;;
        --with-liger) packages+=("$(pin liger-kernel)") ;;
        *) echo "unknown option $option" >&2; exit 2 ;;
    esac
done

mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
du -sh .whl
