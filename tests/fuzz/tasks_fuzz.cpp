// libFuzzer target: kvpack-eval's JSON Lines task reader on arbitrary text. Refusals must be
// std::runtime_error naming the line; what is accepted must have the required fields.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "tasks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    for (const auto& task : kvpack::eval::parse_tasks_jsonl(text, "fuzz")) {
      if (task.answer.empty()) std::abort();  // refused by contract
    }
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).rfind("fuzz", 0) != 0) std::abort();  // must name the source
  }
  return 0;
}
