#!/usr/bin/env bash
# Set up (if needed) and run the project's main job (`ultramem compare`); its errors are its own.
source "$(dirname "$0")/env.sh"
exec ultramem compare "$@"
