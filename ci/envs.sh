# CI environments: NAME -> Python interpreter. Sourced by .ci/run; each NAME has ci/NAME.txt.
# Add an environment by adding a line here and its requirements file.
declare -A CI_PYTHON=(
  [py311]="3.11"
  [py312]="3.12"
)
CI_DEFAULT_ENVS="py311 py312"
