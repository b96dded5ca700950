#!/usr/bin/env bash
# Start (or replace) the web UI container: the same image and server as start_api_container.sh, laid out
# like the UI container it replaces (its name, GPU 2, host port 7860, restart always). The server in it
# answers the API too; the page is at http://localhost:7860/ui (/ redirects there).
#
#   ./start_ui_container.sh [options] [-- extra server flags]
#
# Defaults (each also read from an environment variable; flags win):
#   GPU 2 [STEP_AUDIO_UI_GPU], host port 7860 [STEP_AUDIO_UI_HOST_PORT], container name
#   step-audio-ui-opt [STEP_AUDIO_UI_CONTAINER]. Every other option, and --help, is start_api_container.sh's.
# With --api-key (after --) the page asks for the key.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    echo
    exec "${script_dir}/start_api_container.sh" --help
fi

# the layout's defaults come first: the caller's flags, parsed after them, win
exec "${script_dir}/start_api_container.sh" \
    --gpu "${STEP_AUDIO_UI_GPU:-2}" \
    --port "${STEP_AUDIO_UI_HOST_PORT:-7860}" \
    --name "${STEP_AUDIO_UI_CONTAINER:-step-audio-ui-opt}" \
    "$@"
