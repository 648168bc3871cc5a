#!/usr/bin/env bash
# Set up (if needed) and run the project's main job.
source "$(dirname "$0")/env.sh"
if python -c "import ultramem.cli" 2>/dev/null && ultramem compare --help >/dev/null 2>&1; then
  exec ultramem compare "$@"
fi
exec python -m ultramem.bench.layer_bench "$@"
