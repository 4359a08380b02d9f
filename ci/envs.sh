# CI environments: NAME -> Python interpreter. Sourced by .ci/run; each NAME has ci/NAME.txt.
# Add an environment by adding a line here and its requirements file.
declare -A CI_PYTHON=(
  [py311]="3.11"
  [py312]="3.12"
)
CI_DEFAULT_ENVS="py311 py312"
# Test paths per environment (default: the whole suite). py312 exists for megatron-core 0.19 (its
# megatron/training, pretrain()), torch 2.14 (which ships Triton: the kernels' interpreter test) and
# the Hugging Face Trainer: it runs the engine-facing suites; the engine-free core, distributed and
# kernel suites run once, in py311.
declare -A CI_TESTS=(
  [py311]="tests"
  [py312]="tests/megatron tests/models tests/patching tests/deepspeed tests/test_imports.py tests/kernels/test_triton_interpreter.py"
)
