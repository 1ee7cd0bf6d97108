#include "model_fixture.hpp"

#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

namespace kvpack::test {
namespace {

int skipped = 0;

bool model_available() {
  static const bool available = [] {
    struct stat st;
    return ::stat(llama::reference_model_path().c_str(), &st) == 0;
  }();
  if (!available) {
    const char* require = std::getenv("KVPACK_REQUIRE_MODEL");
    if (require && std::string(require) != "0" && std::string(require) != "") {
      FAIL("KVPACK_REQUIRE_MODEL is set but there is no model at '"
           << llama::reference_model_path() << "' (run scripts/fetch_model.sh)");
    }
    ++skipped;
    WARN("SKIPPED: no model at '" << llama::reference_model_path()
                                  << "'; run scripts/fetch_model.sh or set KVPACK_MODEL");
  }
  return available;
}

}  // namespace

const llama::GgufFile* reference_gguf() {
  if (!model_available()) return nullptr;
  static const std::unique_ptr<llama::GgufFile> file =
      std::make_unique<llama::GgufFile>(llama::GgufFile::open(llama::reference_model_path()));
  return file.get();
}

const llama::Tokenizer* reference_tokenizer() {
  const llama::GgufFile* file = reference_gguf();
  if (!file) return nullptr;
  static const std::unique_ptr<llama::Tokenizer> tokenizer =
      std::make_unique<llama::Tokenizer>(llama::Tokenizer::from_gguf(*file));
  return tokenizer.get();
}

const llama::LlamaModel* reference_model() {
  const llama::GgufFile* file = reference_gguf();
  if (!file) return nullptr;
  static const std::unique_ptr<llama::LlamaModel> model =
      std::make_unique<llama::LlamaModel>(llama::LlamaModel::from_gguf(*file));
  return model.get();
}

int real_model_tests_skipped() { return skipped; }

std::string read_test_data(const std::string& name) {
  const std::string path = std::string(KVPACK_MODEL_TEST_DATA_DIR) + "/" + name;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open test data '" + path + "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace kvpack::test
