#pragma once
// Shared access to the reference model for the real-model tests: loaded once per process.

#include <memory>
#include <string>

#include "gguf.hpp"
#include "model.hpp"
#include "model_path.hpp"
#include "tokenizer.hpp"

namespace kvpack::test {

/// CTest treats this exit code as "skipped" (SKIP_RETURN_CODE).
inline constexpr int kSkipReturnCode = 77;

/// The parsed reference model file, or nullptr (and the test counted as skipped) when absent.
/// With KVPACK_REQUIRE_MODEL=1 in the environment a missing file fails the test instead.
const llama::GgufFile* reference_gguf();
/// Tokenizer of the reference model, or nullptr when the file is absent.
const llama::Tokenizer* reference_tokenizer();
/// The loaded reference model, or nullptr when the file is absent.
const llama::LlamaModel* reference_model();

/// How many real-model checks found no model.
int real_model_tests_skipped();

/// Text of a file under tests/model/data.
std::string read_test_data(const std::string& name);

}  // namespace kvpack::test
