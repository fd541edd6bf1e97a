#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the NVIDIA check installs on a machine
# without one (bench/gpu/README.md), at the versions uv.lock pins, and split the CUDA build of MLX
# (87 MB) so that no transfer exceeds 64 MiB:
#   .whl/part1/  the first 44 MiB of mlx-cuda-13                     (first command)
#   .whl/part2/  the rest of it + every other wheel (~50 MiB in all)  (second command)
# Usage: bench/gpu/fetch_wheels.sh [x86_64|aarch64]   (default x86_64; Python 3.12, CPython)
# .whl/ is git-ignored: wheels are never committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${1:-x86_64}
DEST=.whl
PY=${PY:-python3}
# The GPU machine already has torch, transformers, tokenizers (and with them numpy, safetensors'
# deps, huggingface-hub, requests, pyyaml, regex, tqdm, packaging); these are what lorad and
# mflux need on top, plus pytest for the engine tests.
PACKAGES="mlx-cuda-13 mlx mflux piexif toml platformdirs huey watchdog structlog pillow safetensors psutil
          jinja2 markupsafe pytest pytest-timeout pluggy iniconfig pygments"

pins=$($PY - "$PACKAGES" <<'PY'
import sys, tomllib
lock = tomllib.load(open("uv.lock", "rb"))
versions = {}
for p in lock["package"]:
    versions.setdefault(p["name"], []).append(p["version"])
out = []
for name in sys.argv[1].split():
    found = versions.get(name)
    if not found:
        sys.exit(f"fetch_wheels: {name} is not in uv.lock")
    # mlx has a Linux and a macOS pin: take the one mflux's CUDA build is pinned with.
    version = versions["mlx-cuda-13"][0] if name == "mlx" else found[0]
    out.append(f"{name}=={version}")
print(" ".join(out))
PY
)
echo "pins: $pins"
rm -rf "$DEST" && mkdir -p "$DEST/all" "$DEST/part1" "$DEST/part2"
# mlx and mlx-cuda-13 are manylinux_2_35 (glibc >= 2.35); the rest use older manylinux tags.
platforms=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${tag}_${ARCH}")
done
# shellcheck disable=SC2086
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST/all" $pins
big=$(ls "$DEST"/all/mlx_cuda_13-*.whl)
(cd "$DEST/part1" && split -b 44m "../../$big" "$(basename "$big").part-")
mv "$DEST/part1/$(basename "$big").part-ab" "$DEST/part2/"
( cd "$DEST/all" && sha256sum "$(basename "$big")" ) > "$DEST/part2/$(basename "$big").sha256"
find "$DEST/all" -name '*.whl' ! -name 'mlx_cuda_13-*' -exec cp {} "$DEST/part2/" \;
echo "wheels: $(ls "$DEST/all" | wc -l) in $DEST/all"
du -sh "$DEST/part1" "$DEST/part2"
ls -l "$DEST/part1" "$DEST/part2"
