#pragma once
// GGUF (v2/v3) reader for the reference model. The whole file is loaded into memory and every
// read is bounds-checked, so a truncated or corrupted file ends in a GgufError, never in an
// out-of-bounds read.

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kvpack::llama {

/// Thrown for any malformed, truncated or unsupported GGUF input; the message says what was wrong.
class GgufError : public std::runtime_error {
 public:
  explicit GgufError(const std::string& what) : std::runtime_error("gguf: " + what) {}
};

/// Metadata value types, numbered as in the GGUF specification.
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

const char* gguf_type_name(GgufType type);

/// One metadata value. Integers keep their sign in the member that fits, floats widen to double,
/// arrays hold their elements (all of `elem_type`).
struct GgufValue {
  GgufType type = GgufType::kUint8;
  uint64_t u = 0;  // kUint*, kBool
  int64_t i = 0;   // kInt*
  double f = 0.0;  // kFloat*
  std::string str;
  GgufType elem_type = GgufType::kUint8;  // kArray only
  std::vector<GgufValue> items;           // kArray only

  bool is_integer() const;
  /// Integer value of any integer type, range-checked into int64; throws GgufError otherwise.
  int64_t as_int(const std::string& key) const;
  /// Numeric value of any integer or float type.
  double as_double(const std::string& key) const;
};

/// Tensor element types, numbered as ggml numbers them. Only the types listed here are accepted.
enum class TensorType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

/// Block geometry of a tensor type: `block_size` values stored in `block_bytes` bytes.
struct TensorTypeTraits {
  const char* name;
  int64_t block_size;
  int64_t block_bytes;
};

/// Traits of a known type; throws GgufError for a number that is not a known type.
TensorTypeTraits tensor_type_traits(uint32_t type);

struct TensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // dims[0] is the contiguous row length
  TensorType type = TensorType::kF32;
  uint64_t offset = 0;  // relative to the data section
  int64_t n_elements = 0;
  uint64_t n_bytes = 0;

  int64_t row_length() const { return dims.empty() ? 1 : dims[0]; }
  int64_t n_rows() const { return dims.empty() ? 1 : n_elements / dims[0]; }
};

class GgufFile {
 public:
  /// Reads and validates a file; throws GgufError (or std::runtime_error for I/O errors).
  static GgufFile open(const std::string& path);
  /// Parses an in-memory image of a file.
  static GgufFile parse(std::vector<uint8_t> bytes);

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  size_t file_size() const { return bytes_.size(); }

  /// Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const GgufValue* find(const std::string& key) const;
  bool has(const std::string& key) const { return find(key) != nullptr; }
  /// Typed getters: throw GgufError naming the key when it is missing or of the wrong type.
  const GgufValue& get(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(const std::string& name) const;
  /// Throws GgufError naming the tensor when it is absent.
  const TensorInfo& tensor(const std::string& name) const;
  /// Start of a tensor's bytes (n_bytes of them are inside the file, checked at parse time).
  const uint8_t* tensor_data(const TensorInfo& info) const;

 private:
  GgufFile() = default;
  void parse_all();

  std::vector<uint8_t> bytes_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::unordered_map<std::string, size_t> metadata_index_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace kvpack::llama
