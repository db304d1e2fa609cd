# Shared set-up steps of scripts/test and scripts/run (sourced, not run).
# Every step is idempotent: it does nothing when its result is already there.

PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--disable-pip-version-check --progress-bar off)

# pip_install PYTHON PIP-ARGS...: `PYTHON -m pip install PIP-ARGS`, showing one line per package
# it fetches (on a terminal: one line, rewritten) instead of pip's several lines per package, or
# nothing for minutes with --quiet. pip's warnings and errors (stderr) are shown as they are.
pip_install() {
    local python=$1 line name names=() status=0
    shift
    # Unbuffered: pip's lines reach the loop as they are written, not in bursts.
    PYTHONUNBUFFERED=1 "$python" -m pip install "${PIP_FLAGS[@]}" "$@" | while IFS= read -r line; do
        case $line in
            "Collecting "*)
                name=${line#Collecting }
                name=${name%%[ <>=!~;\[]*}
                _progress "fetching $name"
                ;;
            "Processing /"*".whl"*)  # a wheel a find-links directory or a local index holds
                name=${line#Processing }
                name=${name%% *}
                name=${name##*/}
                _progress "fetching ${name%%-[0-9]*}"
                ;;
            "Installing collected packages: "*)
                IFS=, read -ra names <<<"${line#*: }"
                _progress "installing ${#names[@]} packages (unpacking takes a moment) ..."
                ;;
        esac
    done || status=$?  # pip's own (pipefail), kept past the line below
    [ ! -t 2 ] || echo >&2  # end the rewritten line
    return "$status"
}

_progress() {
    if [ -t 2 ]; then
        printf '\r\033[K  %s' "$1" >&2
    else
        printf '  %s\n' "$1" >&2
    fi
}

# ensure_venv SPEC: .venv with the project installed in editable mode, e.g. ensure_venv '.[test]'.
# Re-installs only when setup.py or pyproject.toml changed since the last install of SPEC.
# editable_mode=compat puts the checkout itself on sys.path (a .pth file), which is what lets twistd
# find twisted/plugins/mpcapi_plugin.py; the default import-hook editable install hides it.
ensure_venv() {
    local spec=$1 stamp candidate candidates
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    stamp=".venv/.installed-compat-${spec//[^a-z]/_}"
    candidates=("$stamp")
    # An install with extras (scripts/test's '.[test]') installed the plain project as well.
    [ "$spec" != . ] || candidates=(.venv/.installed-compat-*)
    for candidate in "${candidates[@]}"; do
        if [ -f "$candidate" ] && [ ! setup.py -nt "$candidate" ] &&
            [ ! pyproject.toml -nt "$candidate" ]; then
            return 0
        fi
    done
    if [ -f "$stamp" ]; then
        echo "setup.py or pyproject.toml changed: updating '$spec' in .venv ..." >&2
    else
        echo "first run: installing '$spec' (the project and its dependencies) into .venv" \
            "(once; later runs skip this) ..." >&2
    fi
    pip_install .venv/bin/python -e "$spec" --config-settings editable_mode=compat
    touch "$stamp"
}

# ensure_litellm_venv: .venv-litellm with the pinned LiteLLM proxy (etc/litellm/requirements.txt).
ensure_litellm_venv() {
    if [ ! -x .venv-litellm/bin/litellm ]; then
        echo "first run: installing the LiteLLM proxy (etc/litellm/requirements.txt) into" \
            ".venv-litellm (once, a few minutes; later runs skip this) ..." >&2
        [ -x .venv-litellm/bin/python ] || "$PYTHON" -m venv .venv-litellm
        pip_install .venv-litellm/bin/python -r etc/litellm/requirements.txt
    fi
}

# ensure_node_clients: tests/clients/node_modules with the npm clients the SDK error tests drive
# (the openai SDK and the Vercel AI SDK, pinned by tests/clients/package-lock.json).
# Re-installs only when the lock file changed since the last install.
ensure_node_clients() {
    local dir=tests/clients stamp=tests/clients/node_modules/.installed
    if ! command -v npm >/dev/null; then
        echo "npm is missing: the SDK error tests need Node.js 18 or later with npm" >&2
        return 1
    fi
    if [ -f "$stamp" ] && [ ! "$dir/package-lock.json" -nt "$stamp" ]; then
        return 0
    fi
    echo "first run: installing the npm test clients (tests/clients/package-lock.json) into" \
        "tests/clients/node_modules (once; later runs skip this) ..." >&2
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    touch "$stamp"
}
