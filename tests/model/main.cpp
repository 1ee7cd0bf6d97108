// Catch2 v2 runner for the model tests. Real-model test cases that find no model file call
// skip_real_model_test(); the run then exits 77 (CTest's SKIP_RETURN_CODE) instead of passing
// silently, after running everything else.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <iostream>

#include "model_fixture.hpp"

int main(int argc, char* argv[]) {
  const int result = Catch::Session().run(argc, argv);
  if (result == 0 && kvpack::test::real_model_tests_skipped() > 0) {
    std::cerr << kvpack::test::real_model_tests_skipped()
              << " real-model check(s) skipped: no model at '"
              << kvpack::llama::reference_model_path()
              << "' (run scripts/fetch_model.sh, or set KVPACK_MODEL)\n";
    return kvpack::test::kSkipReturnCode;
  }
  return result;
}
