#pragma once
// Where the reference model lives (scripts/fetch_model.sh puts it there).

#include <string>

namespace kvpack::llama {

/// File name of the reference model inside the kvpack cache directory.
inline constexpr const char* kReferenceModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// $KVPACK_MODEL if set and non-empty, else ${KVPACK_CACHE:-$HOME/.cache/kvpack}/<model file>.
std::string reference_model_path();

}  // namespace kvpack::llama
