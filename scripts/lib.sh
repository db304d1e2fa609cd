# Shared set-up steps of scripts/test and scripts/run (sourced, not run).
# Every step is idempotent: it does nothing when its result is already there.

PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--quiet --disable-pip-version-check)

# ensure_venv SPEC: .venv with the project installed in editable mode, e.g. ensure_venv '.[test]'.
# Re-installs only when setup.py or pyproject.toml changed since the last install of SPEC.
# editable_mode=compat puts the checkout itself on sys.path (a .pth file), which is what lets twistd
# find twisted/plugins/mpcapi_plugin.py; the default import-hook editable install hides it.
ensure_venv() {
    local spec=$1 stamp
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    stamp=".venv/.installed-compat-${spec//[^a-z]/_}"
    if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "Installing $spec into .venv ..." >&2
        .venv/bin/python -m pip install "${PIP_FLAGS[@]}" -e "$spec" --config-settings editable_mode=compat
        touch "$stamp"
    fi
}

# ensure_litellm_venv: .venv-litellm with the pinned LiteLLM proxy (etc/litellm/requirements.txt).
ensure_litellm_venv() {
    if [ ! -x .venv-litellm/bin/litellm ]; then
        echo "Installing the LiteLLM proxy into .venv-litellm (a few minutes, once) ..." >&2
        [ -x .venv-litellm/bin/python ] || "$PYTHON" -m venv .venv-litellm
        .venv-litellm/bin/python -m pip install "${PIP_FLAGS[@]}" -r etc/litellm/requirements.txt
    fi
}
