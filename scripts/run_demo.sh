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
# ON: a tree CI configured (compile check only) is rebuilt optimized.
KVPACK_BUILD_TARGETS=kvpack-eval bash scripts/build.sh -DKVPACK_TOOLS_OPTIMIZE=ON

build_dir=${KVPACK_BUILD_DIR:-build}
eval_bin=$build_dir/examples/eval/kvpack-eval

# The demo: the frontier on the reference model (full cache, 4-bit KIVI, KVzip at keep 0.33,
# KVzip + 4-bit at 8x requested, L2 at keep 0.33 as the contrast: kvpack-eval's default rows) on a
# 2,048-token context, in the short form: 5 passkey tasks and 64 scored text tokens instead of
# the full evaluation's 10 and 128. About 3 minutes on an idle 2-core machine after the build.
DEMO_ARGS=(--num-tasks 5 --continuation 64)

if [ ! -x "$eval_bin" ]; then
  echo "run_demo: $eval_bin was not built" >&2
  exit 1
fi
start=$SECONDS
"$eval_bin" "${DEMO_ARGS[@]}" "$@"
echo
echo "run_demo: the short form (5 tasks, 64 text tokens) ran in $((SECONDS - start)) s. The full"
echo "evaluation of the same rows (10 tasks, 128 tokens): $eval_bin   (--help for every policy)"
