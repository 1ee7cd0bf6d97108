#pragma once
// The small part of Unicode the tokenizer needs: lenient UTF-8 decoding and the letter / number /
// white-space classes of the pre-tokenizer's split pattern.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kvpack::llama {

/// One decoded character and where its bytes are in the input.
struct Utf8Char {
  uint32_t codepoint;  // kInvalidCodepoint for a byte that does not start a valid sequence
  uint32_t offset;
  uint32_t length;
};

constexpr uint32_t kInvalidCodepoint = 0xFFFFFFFFu;

/// Decodes `text`; malformed, overlong or surrogate sequences become one kInvalidCodepoint per
/// byte, so the bytes are never lost and decoding never fails.
std::vector<Utf8Char> decode_utf8(std::string_view text);

/// Appends the UTF-8 encoding of a valid code point.
void append_utf8(uint32_t codepoint, std::string& out);

bool is_letter(uint32_t codepoint);      // \p{L}
bool is_number(uint32_t codepoint);      // \p{N}
bool is_whitespace(uint32_t codepoint);  // \s: the Unicode White_Space property

}  // namespace kvpack::llama
