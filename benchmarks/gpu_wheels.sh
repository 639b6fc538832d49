#!/usr/bin/env bash
# Wheels the GPU check may need beyond torch, triton and transformers, since a lent GPU machine can
# install only wheels carried to it: Pillow (the engine decodes images with it), pytest, hypothesis and
# pytest-xdist (the kernel tests, compiled by 8 workers), for CPython 3.10-3.14 on x86-64 Linux (~35 MB). Run once from the repository
# root; the one-call command in benchmarks/RESULTS.md installs from the folder (`run` with
# carry=[".gpu_wheels"]) only what the machine lacks.
set -euo pipefail
dest="${1:-.gpu_wheels}"
for version in 3.10 3.11 3.12 3.13 3.14; do
  python3 -m pip download -q --only-binary=:all: --implementation cp --python-version "$version" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dest" "pillow>=10" "pytest>=8" "hypothesis>=6.100" "pytest-xdist>=3" \
    "exceptiongroup>=1" "tomli>=2"  # pytest's and hypothesis' needs on 3.10 only, which pip resolves for the Python it runs on
done
du -sh "$dest"
