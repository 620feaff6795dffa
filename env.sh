# Source this (or let make do it): fixed variables so torch-sys finds the project's libtorch and is not
# rebuilt because one of them changed.
TPP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export VIRTUAL_ENV="$TPP_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset LIBTORCH
