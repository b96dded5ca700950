#!/usr/bin/env bash
# Start (or replace) the Step-Audio-EditX API container on one GPU.
#
#   ./start_api_container.sh [options] [-- extra server flags]
#
# Every option also reads an environment variable (shown in brackets); flags win.
#   -g, --gpu N            GPU index on the host           [STEP_AUDIO_GPU]            default 3
#   -p, --port N           host port for the container's 8000  [STEP_AUDIO_HOST_PORT]  default 8003
#   -m, --models DIR       model bundle root, mounted read-only [STEP_AUDIO_MODEL_DIR] default ./models
#   -c, --cache DIR        persistent cache directory      [STEP_AUDIO_CACHE_DIR]      default ./cache
#   -i, --image NAME       image to run                    [STEP_AUDIO_IMAGE]          default step-audio-server:latest
#   -n, --name NAME        container name                  [STEP_AUDIO_CONTAINER]      default step-audio-api-opt
#   -t, --timeout SECONDS  wait for /healthz and /readyz   [STEP_AUDIO_READY_TIMEOUT]  default 900
#       --no-wait          start and return without waiting
#       --dry-run          print the docker command and run nothing
#   -h, --help             this text
# Extra server flags after `--` (or in STEP_AUDIO_EXTRA_ARGS) go to api_server.py, e.g.
#   ./start_api_container.sh --gpu 0 -- --enable-auto-transcribe --variants base,awq
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

gpu="${STEP_AUDIO_GPU:-3}"
port="${STEP_AUDIO_HOST_PORT:-8003}"
models="${STEP_AUDIO_MODEL_DIR:-${script_dir}/models}"
cache="${STEP_AUDIO_CACHE_DIR:-${script_dir}/cache}"
image="${STEP_AUDIO_IMAGE:-step-audio-server:latest}"
name="${STEP_AUDIO_CONTAINER:-step-audio-api-opt}"
timeout="${STEP_AUDIO_READY_TIMEOUT:-900}"
wait_ready=1
dry_run=0
extra=()
if [[ -n "${STEP_AUDIO_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"${STEP_AUDIO_EXTRA_ARGS}"
fi

die() {
    printf 'start_api_container.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -g | --gpu) need_value "$@"; gpu="$2"; shift 2 ;;
        -p | --port) need_value "$@"; port="$2"; shift 2 ;;
        -m | --models) need_value "$@"; models="$2"; shift 2 ;;
        -c | --cache) need_value "$@"; cache="$2"; shift 2 ;;
        -i | --image) need_value "$@"; image="$2"; shift 2 ;;
        -n | --name) need_value "$@"; name="$2"; shift 2 ;;
        -t | --timeout) need_value "$@"; timeout="$2"; shift 2 ;;
        --no-wait) wait_ready=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra+=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ "${gpu}" =~ ^[0-9]+$ ]] || die "--gpu must be a GPU index (0, 1, ...), got '${gpu}'"
if ! [[ "${port}" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    die "--port must be 1-65535, got '${port}'"
fi
[[ "${timeout}" =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds, got '${timeout}'"
[[ "${name}" =~ ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$ ]] || die "invalid container name '${name}'"

# Verify the bundle before anything touches docker: a container that restarts forever on a
# missing file is worse than a clear message now.
[[ -d "${models}" ]] || die "model directory '${models}' does not exist (fetch it: python3 model_files.py download --model-path '${models}')"
models="$(cd "${models}" && pwd)"
command -v python3 >/dev/null 2>&1 || die "python3 is needed to verify the model directory"
variants="base"
for ((i = 0; i < ${#extra[@]}; i++)); do
    if [[ "${extra[i]}" == "--variants" && $((i + 1)) -lt ${#extra[@]} ]]; then
        variants="${extra[i + 1]}"
    elif [[ "${extra[i]}" == --variants=* ]]; then
        variants="${extra[i]#--variants=}"
    fi
done
python3 "${script_dir}/model_files.py" verify --model-path "${models}" --variants "${variants}" >&2 \
    || die "model directory check failed (see above); nothing was started"

mkdir -p "${cache}"
cache="$(cd "${cache}" && pwd)"

cmd=(docker run -d
    --name "${name}"
    --gpus "\"device=${gpu}\""
    -p "${port}:8000"
    --restart=always
    -e CUDA_VISIBLE_DEVICES=0
    -e PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    -e OMP_NUM_THREADS=8
    -e MKL_NUM_THREADS=8
    -v "${models}:/app/models:ro"
    -v "${cache}:/app/cache"
    "${image}"
    "${extra[@]}")

if ((dry_run)); then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

command -v docker >/dev/null 2>&1 || die "docker is not installed or not on PATH"
if docker container inspect "${name}" >/dev/null 2>&1; then
    echo "replacing existing container ${name}" >&2
    docker rm -f "${name}" >/dev/null
fi
"${cmd[@]}" >/dev/null
echo "started ${name} on GPU ${gpu}, http://localhost:${port}" >&2

if ((wait_ready)); then
    deadline=$((SECONDS + timeout))
    for endpoint in healthz readyz; do
        until curl -fsS --max-time 5 "http://localhost:${port}/${endpoint}" >/dev/null 2>&1; do
            if ((SECONDS >= deadline)); then
                die "no answer from /${endpoint} within ${timeout}s; see: docker logs ${name}"
            fi
            sleep 2
        done
        echo "/${endpoint} ok" >&2
    done
fi

cat >&2 <<EOF
logs:    docker logs -f ${name}      (grep: 'Cache (HIT|MISS)|TF32')
docs:    http://localhost:${port}/docs
web UI:  http://localhost:${port}/ui      (unless started with --no-ui)
health:  curl http://localhost:${port}/healthz
EOF
