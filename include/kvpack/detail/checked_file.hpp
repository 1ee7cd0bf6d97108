/// \file detail/checked_file.hpp
/// \brief The small versioned binary files policies save and load (ChannelShrink projections,
/// KVzip head scores): an 8-byte magic, little-endian fields, a trailing u64 FNV-1a checksum of
/// every preceding byte. A foreign, corrupted or truncated file is a clear error.
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include "../error.hpp"

namespace kvpack {
namespace detail {

inline uint64_t fnv1a(const uint8_t* data, std::size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ data[i]) * 1099511628211ull;
  return h;
}

/// Collects fields, then writes them with the checksum.
class CheckedFileWriter {
 public:
  explicit CheckedFileWriter(const char (&magic)[9]) { put(magic, 8); }
  void put(const void* data, std::size_t n) {
    const auto* b = static_cast<const uint8_t*>(data);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  void put_u32(uint32_t v) { put(&v, 4); }
  void put_u64(uint64_t v) { put(&v, 8); }
  void put_i64(int64_t v) { put(&v, 8); }
  void put_f64(double v) { put(&v, 8); }
  void put_floats(const std::vector<float>& v) { put(v.data(), v.size() * sizeof(float)); }
  /// u32 length, then the characters.
  void put_string(const std::string& s) {
    put_u32(static_cast<uint32_t>(s.size()));
    put(s.data(), s.size());
  }
  /// u64 element count, then the elements' bytes (trivially copyable T).
  template <class T>
  void put_vector(const std::vector<T>& v) {
    static_assert(std::is_trivially_copyable_v<T>, "put_vector writes raw element bytes");
    put_u64(v.size());
    put(v.data(), v.size() * sizeof(T));
  }
  /// Appends the checksum and writes everything to `path`; `who` names the caller in errors.
  void write(const std::string& path, const std::string& who) {
    const uint64_t sum = fnv1a(bytes_.data(), bytes_.size());
    put(&sum, 8);
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes_.data()),
              static_cast<std::streamsize>(bytes_.size()));
    if (!out) throw error(who + ": cannot write '" + path + "'");
  }

 private:
  std::vector<uint8_t> bytes_;
};

/// Reads a whole file, checks magic and checksum, then hands out fields in order.
class CheckedFileReader {
 public:
  /// `what` says what the file should be (for "not a kvpack <what> file").
  CheckedFileReader(const std::string& path, const char (&magic)[9], const std::string& who,
                    const char* what)
      : where_(who + "('" + path + "')") {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw error(who + ": cannot read '" + path + "'");
    bytes_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    if (bytes_.size() < 8 + 4 + 4 + 8 || std::memcmp(bytes_.data(), magic, 8) != 0) {
      throw error(where_ + ": not a kvpack " + what + " file (bad magic or too short)");
    }
    uint64_t stored;
    std::memcpy(&stored, bytes_.data() + bytes_.size() - 8, 8);
    if (stored != fnv1a(bytes_.data(), bytes_.size() - 8)) {
      throw error(where_ + ": checksum mismatch (file corrupted or truncated)");
    }
    at_ = 8;
    end_ = bytes_.size() - 8;
  }

  const std::string& where() const { return where_; }

  uint32_t get_u32() {
    if (at_ + 4 > end_) throw error(where_ + ": truncated");
    uint32_t v;
    std::memcpy(&v, bytes_.data() + at_, 4);
    at_ += 4;
    return v;
  }
  uint64_t get_u64() {
    uint64_t v;
    get(&v, 8, "a 64-bit field");
    return v;
  }
  int64_t get_i64() {
    int64_t v;
    get(&v, 8, "a 64-bit field");
    return v;
  }
  double get_f64() {
    double v;
    get(&v, 8, "a 64-bit field");
    return v;
  }
  /// A put_string field of at most `max_size` characters.
  std::string get_string(std::size_t max_size, const std::string& what) {
    const uint32_t n = get_u32();
    if (n > max_size)
      throw error(concat(where_, ": ", what, " of ", n, " bytes, expected <= ", max_size));
    std::string s(n, '\0');
    get(s.data(), n, what);
    return s;
  }
  /// A put_vector field of at most `max_count` elements (the count the caller expects: a larger
  /// one is refused before anything is allocated).
  template <class T>
  std::vector<T> get_vector(std::size_t max_count, const std::string& what) {
    static_assert(std::is_trivially_copyable_v<T>, "get_vector reads raw element bytes");
    const uint64_t n = get_u64();
    if (n > max_count || n > (end_ - at_) / sizeof(T)) {
      throw error(concat(where_, ": ", what, " holds ", n, " elements, expected at most ",
                         max_count, n > max_count ? "" : " (file truncated)"));
    }
    std::vector<T> v(static_cast<std::size_t>(n));
    get(v.data(), v.size() * sizeof(T), what);
    return v;
  }

  /// The version field, which must equal `expected`.
  void expect_version(uint32_t expected) {
    const uint32_t version = get_u32();
    if (version != expected) {
      throw error(concat(where_, ": version = ", version, ", expected ", expected));
    }
  }
  /// `n` floats, every one finite; `what` names them when the file holds fewer or a value is
  /// NaN or infinite (no field of these files may be: a checksum only proves the bytes are the
  /// ones written, not that the writer was sane).
  std::vector<float> get_floats(std::size_t n, const std::string& what) {
    if (n > (end_ - at_) / sizeof(float)) throw error(where_ + ": " + what + " truncated");
    std::vector<float> v(n);
    std::memcpy(v.data(), bytes_.data() + at_, n * sizeof(float));
    for (std::size_t i = 0; i < n; ++i) {
      if (!std::isfinite(v[i])) {
        throw error(concat(where_, ": ", what, " value ", i, " = ", v[i], ", expected finite"));
      }
    }
    at_ += n * sizeof(float);
    return v;
  }
  /// Every field read: trailing bytes are an error.
  void finish() const {
    if (at_ != end_) throw error(where_ + ": trailing bytes after the last field");
  }

 private:
  void get(void* dst, std::size_t n, const std::string& what) {
    if (n > end_ - at_) throw error(where_ + ": " + what + " truncated");
    if (n == 0) return;  // dst may be an empty vector's null data()
    std::memcpy(dst, bytes_.data() + at_, n);
    at_ += n;
  }

  std::string where_;
  std::vector<uint8_t> bytes_;
  std::size_t at_ = 0, end_ = 0;
};

}  // namespace detail
}  // namespace kvpack
