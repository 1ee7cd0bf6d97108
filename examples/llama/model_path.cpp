#include "model_path.hpp"

#include <cstdlib>

namespace kvpack::llama {

std::string reference_model_path() {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v ? std::string(v) : std::string();
  };
  if (std::string model = env("KVPACK_MODEL"); !model.empty()) return model;
  std::string dir = env("KVPACK_CACHE");
  if (dir.empty()) {
    const std::string home = env("HOME");
    dir = (home.empty() ? std::string(".") : home) + "/.cache/kvpack";
  }
  return dir + "/" + kReferenceModelFile;
}

}  // namespace kvpack::llama
