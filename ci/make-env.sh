#!/usr/bin/env bash
# Usage: ci/make-env.sh NAME CACHE_DIR
# Prints the path of a virtual environment for CI environment NAME (ci/envs.sh, ci/NAME.txt),
# creating it under CACHE_DIR when no complete one exists. The folder name carries a hash of the
# requirements file and interpreter version, so a changed recipe gets a new venv and an unchanged one
# is reused across runs on the same machine. All progress goes to stderr.
set -euo pipefail
name="$1"
cache="$2"
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=envs.sh
source "$here/envs.sh"
version="${CI_PYTHON[$name]:?unknown CI environment $name (see ci/envs.sh)}"
requirements="$here/$name.txt"

find_python() {
  local v="$1" candidate
  for candidate in "python$v" /root/.pyenv/versions/"$v".*/bin/"python$v"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    candidate="$(pyenv root)/versions/$(pyenv versions --bare | grep -E "^${v//./\\.}(\.|$)" | sort -V | tail -1)/bin/python$v"
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  fi
  return 1
}

python="$(find_python "$version")" || { echo "ci: no Python $version found (PATH or pyenv)" >&2; exit 1; }
full_version="$("$python" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')"
key="$( (cat "$requirements"; echo "$full_version") | sha256sum | cut -c1-12)"
venv="$cache/$name-$key"

if [ ! -f "$venv/.complete" ]; then
  echo "ci: creating $venv with Python $full_version from $requirements" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  # The venv's bundled pip on purpose: newer pips do not apply this machine's torch cap inside build
  # environments (deepspeed builds from an sdist).
  # (This machine's pip config names local indexes that lack most projects: drop pip's note on each.)
  "$venv/bin/python" -m pip install --quiet -r "$requirements" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  touch "$venv/.complete"
else
  echo "ci: reusing $venv" >&2
fi
echo "$venv"
