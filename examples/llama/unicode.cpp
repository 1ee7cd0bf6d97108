#include "unicode.hpp"

#include <algorithm>
#include <iterator>

namespace kvpack::llama {
namespace {

struct CodepointRange {
  uint32_t first;
  uint32_t last;
};

#include "unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodepointRange (&ranges)[N], uint32_t cp) {
  // First range whose end is >= cp; cp is inside iff that range starts at or before it.
  const CodepointRange* it =
      std::lower_bound(std::begin(ranges), std::end(ranges), cp,
                       [](const CodepointRange& r, uint32_t value) { return r.last < value; });
  return it != std::end(ranges) && it->first <= cp;
}

}  // namespace

std::vector<Utf8Char> decode_utf8(std::string_view text) {
  std::vector<Utf8Char> out;
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    uint32_t cp = kInvalidCodepoint;
    size_t len = 1;
    size_t need = 0;
    uint32_t min_cp = 0;
    if (c < 0x80) {
      cp = c;
    } else if ((c & 0xE0) == 0xC0) {
      need = 1, cp = c & 0x1F, min_cp = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      need = 2, cp = c & 0x0F, min_cp = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      need = 3, cp = c & 0x07, min_cp = 0x10000;
    } else {
      cp = kInvalidCodepoint;  // stray continuation byte or 0xF8..0xFF
    }
    if (need > 0) {
      bool ok = i + need < n;  // all continuation bytes present
      for (size_t k = 1; ok && k <= need; ++k) {
        if ((s[i + k] & 0xC0) != 0x80) ok = false;
      }
      if (ok) {
        for (size_t k = 1; k <= need; ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
        if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) ok = false;
      }
      if (ok) {
        len = need + 1;
      } else {
        cp = kInvalidCodepoint;
      }
    }
    out.push_back({cp, static_cast<uint32_t>(i), static_cast<uint32_t>(len)});
    i += len;
  }
  return out;
}

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return cp != kInvalidCodepoint && in_ranges(kLetterRanges, cp);
}

bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return cp != kInvalidCodepoint && in_ranges(kNumberRanges, cp);
}

bool is_whitespace(uint32_t cp) {
  switch (cp) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

}  // namespace kvpack::llama
