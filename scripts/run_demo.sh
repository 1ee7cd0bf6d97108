#!/usr/bin/env bash
# The main job: fetches the reference model (SmolLM2-135M-Instruct) into ~/.cache/kvpack, builds
# kvpack, and runs the evaluation of the compression policies against the full cache on it.
# Without the evaluation binary it runs the synthetic demo instead. Extra arguments go to the
# program that runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
export KVPACK_SETUP_DONE=1
if [ -f scripts/fetch_model.sh ]; then
  bash scripts/fetch_model.sh
fi
bash scripts/build.sh

build_dir=${KVPACK_BUILD_DIR:-build}
eval_bin=$build_dir/examples/kvpack-eval
synthetic_bin=$build_dir/examples/kvpack-synthetic-demo

# >>> DEMO_ARGS: the default short evaluation; the evaluation's author finalizes these flags. <<<
DEMO_ARGS=(--policy full --policy l2)

if [ -x "$eval_bin" ]; then
  exec "$eval_bin" "${DEMO_ARGS[@]}" "$@"
elif [ -x "$synthetic_bin" ]; then
  echo "run_demo: $eval_bin not built; running the synthetic demo" >&2
  exec "$synthetic_bin" "$@"
else
  echo "run_demo: neither $eval_bin nor $synthetic_bin was built" >&2
  exit 1
fi
