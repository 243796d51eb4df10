#!/usr/bin/env bash
# Rebuild the editable install of hiquant (incremental). Serialized with a lock so that several
# developers sharing one checkout never run two builds in the same build folder at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/hiquant-build.lock pip install --no-build-isolation --no-deps -q -e . "$@"
