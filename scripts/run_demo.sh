#!/usr/bin/env bash
# The main job: fetches the reference model (SmolLM2-135M-Instruct) into ~/.cache/kvpack, builds
# kvpack, and runs the evaluation of the compression policies against the full cache on it.
# Extra arguments go to kvpack-eval (e.g. --policy kvzip --keep 0.33; see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
export KVPACK_SETUP_DONE=1
if [ -f scripts/fetch_model.sh ]; then
  bash scripts/fetch_model.sh
fi
# Only what the demo runs: the full test build is run_tests.sh's job.
KVPACK_BUILD_TARGETS=kvpack-eval bash scripts/build.sh

build_dir=${KVPACK_BUILD_DIR:-build}
eval_bin=$build_dir/examples/eval/kvpack-eval

# The default short evaluation (about two minutes of model time on 2 cores): the full cache and
# L2NormEvict at two budgets on a 2 K-token context, 5 passkey tasks and 128 scored text tokens.
DEMO_ARGS=(--policy l2 --keep 0.5,0.25 --context 2048 --num-tasks 5)

if [ ! -x "$eval_bin" ]; then
  echo "run_demo: $eval_bin was not built" >&2
  exit 1
fi
exec "$eval_bin" "${DEMO_ARGS[@]}" "$@"
