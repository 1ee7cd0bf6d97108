// libFuzzer target: the GGUF reader of the reference model (examples/llama), on arbitrary bytes.
// Parses, reads every metadata value through the typed getters, dequantizes the first row of
// every tensor it can, and builds the tokenizer from the metadata. Refusals must be GgufError /
// std::runtime_error; a crash, a hang, a leak or a sanitizer report is a finding.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dequant.hpp"
#include "gguf.hpp"
#include "tokenizer.hpp"

using namespace kvpack::llama;

namespace {

/// Calls f, accepting the refusals the reader documents.
template <class F>
void refusable(F&& f) {
  try {
    f();
  } catch (const std::runtime_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  refusable([&] {
    const GgufFile file = GgufFile::parse(std::vector<uint8_t>(data, data + size));
    for (const auto& entry : file.metadata()) {
      const std::string& key = entry.first;  // (clang 14 cannot capture a structured binding)
      refusable([&] { (void)file.get_int(key); });
      refusable([&] { (void)file.get_float(key); });
      refusable([&] { (void)file.get_bool(key); });
      refusable([&] { (void)file.get_string(key); });
      refusable([&] { (void)file.get_string_array(key); });
      refusable([&] { (void)file.get_int_array(key); });
    }
    std::vector<float> row;
    for (const TensorInfo& t : file.tensors()) {
      if (!can_dequantize(t.type)) continue;
      // One row, at most 4 K values: enough to read every block kind without slow inputs.
      const int64_t n = t.row_length() < 4096 ? t.row_length() : 4096;
      if (n <= 0 || n > t.n_elements) continue;
      row.resize(static_cast<std::size_t>(n));
      refusable([&] { dequantize_row(t.type, file.tensor_data(t), row.data(), n); });
    }
    refusable([&] {
      const Tokenizer tok = Tokenizer::from_gguf(file);
      (void)tok.encode("Hello, world! 12345 caf\xc3\xa9\n\n  x");
    });
  });
  return 0;
}
