#include "gguf.hpp"

#include <cstring>
#include <fstream>
#include <limits>

namespace kvpack::llama {
namespace {

constexpr uint32_t kMaxDims = 4;   // ggml's GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;  // arrays of arrays: bounded so recursion cannot explode
constexpr uint64_t kMaxKeyLength = 1 << 16;

// Smallest encoded size of a value of each type, used to reject counts that cannot fit in the
// bytes left before any memory is reserved for them.
uint64_t min_encoded_size(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
    case GgufType::kString:
      return 8;
    case GgufType::kArray:
      return 12;
  }
  return 1;
}

bool is_known_value_type(uint32_t t) { return t <= 12; }

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  size_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  template <typename T>
  T read(const char* what) {
    if (remaining() < sizeof(T)) {
      throw GgufError("truncated file: cannot read " + std::string(what) + " (" +
                      std::to_string(sizeof(T)) + " bytes) at offset " + std::to_string(pos_) +
                      ", file size " + std::to_string(size_));
    }
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string read_string(const std::string& what, uint64_t max_length) {
    const uint64_t length = read<uint64_t>("string length");
    if (length > remaining()) {
      throw GgufError("string length " + std::to_string(length) + " of " + what + " at offset " +
                      std::to_string(pos_ - 8) + " runs past the end of the file (" +
                      std::to_string(remaining()) + " bytes left)");
    }
    if (length > max_length) {
      throw GgufError("string length " + std::to_string(length) + " of " + what +
                      " exceeds the limit " + std::to_string(max_length));
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(length));
    pos_ += static_cast<size_t>(length);
    return s;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

GgufValue read_value(Reader& r, GgufType type, const std::string& key, int depth);

GgufValue read_array(Reader& r, const std::string& key, int depth) {
  if (depth >= kMaxArrayDepth) {
    throw GgufError("arrays nested deeper than " + std::to_string(kMaxArrayDepth) + " in key '" +
                    key + "'");
  }
  GgufValue v;
  v.type = GgufType::kArray;
  const uint32_t elem = r.read<uint32_t>("array element type");
  if (!is_known_value_type(elem)) {
    throw GgufError("unknown array element type " + std::to_string(elem) + " in key '" + key + "'");
  }
  v.elem_type = static_cast<GgufType>(elem);
  const uint64_t count = r.read<uint64_t>("array length");
  const uint64_t min_size = min_encoded_size(v.elem_type);
  if (count > r.remaining() / min_size) {
    throw GgufError("array length " + std::to_string(count) + " of key '" + key +
                    "' cannot fit in the " + std::to_string(r.remaining()) +
                    " bytes left in the file");
  }
  v.items.reserve(static_cast<size_t>(count));
  for (uint64_t i = 0; i < count; ++i)
    v.items.push_back(read_value(r, v.elem_type, key, depth + 1));
  return v;
}

GgufValue read_value(Reader& r, GgufType type, const std::string& key, int depth) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufType::kUint8:
      v.u = r.read<uint8_t>("u8 value");
      break;
    case GgufType::kInt8:
      v.i = r.read<int8_t>("i8 value");
      break;
    case GgufType::kUint16:
      v.u = r.read<uint16_t>("u16 value");
      break;
    case GgufType::kInt16:
      v.i = r.read<int16_t>("i16 value");
      break;
    case GgufType::kUint32:
      v.u = r.read<uint32_t>("u32 value");
      break;
    case GgufType::kInt32:
      v.i = r.read<int32_t>("i32 value");
      break;
    case GgufType::kFloat32:
      v.f = r.read<float>("f32 value");
      break;
    case GgufType::kBool: {
      const uint8_t b = r.read<uint8_t>("bool value");
      if (b > 1) {
        throw GgufError("bool value " + std::to_string(b) + " of key '" + key +
                        "' is neither 0 nor 1");
      }
      v.u = b;
      break;
    }
    case GgufType::kString:
      v.str = r.read_string("value of key '" + key + "'", std::numeric_limits<uint64_t>::max());
      break;
    case GgufType::kArray:
      return read_array(r, key, depth);
    case GgufType::kUint64:
      v.u = r.read<uint64_t>("u64 value");
      break;
    case GgufType::kInt64:
      v.i = r.read<int64_t>("i64 value");
      break;
    case GgufType::kFloat64:
      v.f = r.read<double>("f64 value");
      break;
  }
  return v;
}

bool checked_mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

const char* gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
      return "u8";
    case GgufType::kInt8:
      return "i8";
    case GgufType::kUint16:
      return "u16";
    case GgufType::kInt16:
      return "i16";
    case GgufType::kUint32:
      return "u32";
    case GgufType::kInt32:
      return "i32";
    case GgufType::kFloat32:
      return "f32";
    case GgufType::kBool:
      return "bool";
    case GgufType::kString:
      return "string";
    case GgufType::kArray:
      return "array";
    case GgufType::kUint64:
      return "u64";
    case GgufType::kInt64:
      return "i64";
    case GgufType::kFloat64:
      return "f64";
  }
  return "unknown";
}

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

int64_t GgufValue::as_int(const std::string& key) const {
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kUint16:
    case GgufType::kUint32:
    case GgufType::kUint64:
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw GgufError("value " + std::to_string(u) + " of key '" + key + "' is too large");
      }
      return static_cast<int64_t>(u);
    case GgufType::kInt8:
    case GgufType::kInt16:
    case GgufType::kInt32:
    case GgufType::kInt64:
      return i;
    default:
      throw GgufError("key '" + key + "' has type " + gguf_type_name(type) +
                      ", expected an integer");
  }
}

double GgufValue::as_double(const std::string& key) const {
  if (type == GgufType::kFloat32 || type == GgufType::kFloat64) return f;
  if (is_integer()) return static_cast<double>(as_int(key));
  throw GgufError("key '" + key + "' has type " + gguf_type_name(type) + ", expected a number");
}

TensorTypeTraits tensor_type_traits(uint32_t type) {
  switch (static_cast<TensorType>(type)) {
    case TensorType::kF32:
      return {"F32", 1, 4};
    case TensorType::kF16:
      return {"F16", 1, 2};
    case TensorType::kBF16:
      return {"BF16", 1, 2};
    case TensorType::kQ4_0:
      return {"Q4_0", 32, 18};
    case TensorType::kQ4_1:
      return {"Q4_1", 32, 20};
    case TensorType::kQ5_0:
      return {"Q5_0", 32, 22};
    case TensorType::kQ5_1:
      return {"Q5_1", 32, 24};
    case TensorType::kQ8_0:
      return {"Q8_0", 32, 34};
    case TensorType::kQ8_1:
      return {"Q8_1", 32, 36};
    case TensorType::kQ2_K:
      return {"Q2_K", 256, 84};
    case TensorType::kQ3_K:
      return {"Q3_K", 256, 110};
    case TensorType::kQ4_K:
      return {"Q4_K", 256, 144};
    case TensorType::kQ5_K:
      return {"Q5_K", 256, 176};
    case TensorType::kQ6_K:
      return {"Q6_K", 256, 210};
    case TensorType::kQ8_K:
      return {"Q8_K", 256, 292};
  }
  throw GgufError("unknown tensor type " + std::to_string(type));
}

GgufFile GgufFile::open(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw GgufError("cannot open '" + path + "'");
  const std::streamoff size = in.tellg();
  if (size < 0) throw GgufError("cannot determine the size of '" + path + "'");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size)) {
    throw GgufError("cannot read '" + path + "'");
  }
  try {
    return parse(std::move(bytes));
  } catch (const GgufError& e) {
    throw GgufError(std::string(e.what() + 6) + " (file '" + path + "')");
  }
}

GgufFile GgufFile::parse(std::vector<uint8_t> bytes) {
  GgufFile file;
  file.bytes_ = std::move(bytes);
  file.parse_all();
  return file;
}

void GgufFile::parse_all() {
  Reader r(bytes_.data(), bytes_.size());
  char magic[4];
  for (char& c : magic) c = static_cast<char>(r.read<uint8_t>("magic"));
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    throw GgufError("bad magic: expected 'GGUF' at offset 0");
  }
  version_ = r.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3) {
    throw GgufError("unsupported version " + std::to_string(version_) + ", expected 2 or 3");
  }
  const uint64_t tensor_count = r.read<uint64_t>("tensor count");
  const uint64_t kv_count = r.read<uint64_t>("metadata count");
  // A key/value pair takes at least 13 bytes and a tensor record at least 32.
  if (kv_count > r.remaining() / 13) {
    throw GgufError("metadata count " + std::to_string(kv_count) + " cannot fit in the file");
  }
  if (tensor_count > r.remaining() / 32) {
    throw GgufError("tensor count " + std::to_string(tensor_count) + " cannot fit in the file");
  }

  metadata_.reserve(static_cast<size_t>(kv_count));
  for (uint64_t n = 0; n < kv_count; ++n) {
    std::string key = r.read_string("metadata key #" + std::to_string(n), kMaxKeyLength);
    const uint32_t type = r.read<uint32_t>("value type");
    if (!is_known_value_type(type)) {
      throw GgufError("unknown value type " + std::to_string(type) + " for key '" + key + "'");
    }
    GgufValue value = read_value(r, static_cast<GgufType>(type), key, 0);
    if (metadata_index_.count(key)) throw GgufError("duplicate metadata key '" + key + "'");
    metadata_index_.emplace(key, metadata_.size());
    metadata_.emplace_back(std::move(key), std::move(value));
  }

  if (const GgufValue* a = find("general.alignment")) {
    if (a->type != GgufType::kUint32) {
      throw GgufError(std::string("general.alignment has type ") + gguf_type_name(a->type) +
                      ", expected u32");
    }
    if (a->u == 0 || (a->u & (a->u - 1)) != 0) {
      throw GgufError("general.alignment " + std::to_string(a->u) + " is not a power of two");
    }
    alignment_ = a->u;
  }

  tensors_.reserve(static_cast<size_t>(tensor_count));
  for (uint64_t n = 0; n < tensor_count; ++n) {
    TensorInfo t;
    t.name = r.read_string("tensor name #" + std::to_string(n), kMaxKeyLength);
    const uint32_t n_dims = r.read<uint32_t>("tensor dimension count");
    if (n_dims == 0 || n_dims > kMaxDims) {
      throw GgufError("tensor '" + t.name + "' has " + std::to_string(n_dims) +
                      " dimensions, expected 1 to " + std::to_string(kMaxDims));
    }
    int64_t elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = r.read<uint64_t>("tensor dimension");
      if (dim == 0 || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw GgufError("tensor '" + t.name + "' dimension " + std::to_string(d) + " is " +
                        std::to_string(dim) + ", expected a positive size");
      }
      if (!checked_mul(elements, static_cast<int64_t>(dim), &elements)) {
        throw GgufError("tensor '" + t.name + "' element count overflows");
      }
      t.dims.push_back(static_cast<int64_t>(dim));
    }
    t.n_elements = elements;
    const uint32_t type = r.read<uint32_t>("tensor type");
    TensorTypeTraits traits;
    try {
      traits = tensor_type_traits(type);
    } catch (const GgufError&) {
      throw GgufError("tensor '" + t.name + "' has unknown type " + std::to_string(type));
    }
    t.type = static_cast<TensorType>(type);
    if (t.dims[0] % traits.block_size != 0) {
      throw GgufError("tensor '" + t.name + "' row length " + std::to_string(t.dims[0]) +
                      " is not a multiple of the " + traits.name + " block size " +
                      std::to_string(traits.block_size));
    }
    int64_t n_bytes = 0;
    if (!checked_mul(elements / traits.block_size, traits.block_bytes, &n_bytes)) {
      throw GgufError("tensor '" + t.name + "' byte size overflows");
    }
    t.n_bytes = static_cast<uint64_t>(n_bytes);
    t.offset = r.read<uint64_t>("tensor offset");
    if (t.offset % alignment_ != 0) {
      throw GgufError("tensor '" + t.name + "' offset " + std::to_string(t.offset) +
                      " is not a multiple of the alignment " + std::to_string(alignment_));
    }
    if (tensor_index_.count(t.name)) throw GgufError("duplicate tensor name '" + t.name + "'");
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  const uint64_t header_end = r.pos();
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  if (tensors_.empty()) return;
  if (data_offset_ > bytes_.size()) {
    throw GgufError("data section at offset " + std::to_string(data_offset_) +
                    " starts past the end of the file (size " + std::to_string(bytes_.size()) +
                    ")");
  }
  const uint64_t data_size = bytes_.size() - data_offset_;
  for (const TensorInfo& t : tensors_) {
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      throw GgufError("tensor '" + t.name + "' data [" + std::to_string(t.offset) + ", +" +
                      std::to_string(t.n_bytes) + ") runs past the end of the data section (" +
                      std::to_string(data_size) + " bytes)");
    }
  }
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = metadata_index_.find(key);
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second].second;
}

const GgufValue& GgufFile::get(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw GgufError("missing metadata key '" + key + "'");
  return *v;
}

int64_t GgufFile::get_int(const std::string& key) const { return get(key).as_int(key); }

double GgufFile::get_float(const std::string& key) const { return get(key).as_double(key); }

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufType::kBool) {
    throw GgufError("key '" + key + "' has type " + gguf_type_name(v.type) + ", expected bool");
  }
  return v.u != 0;
}

const std::string& GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufType::kString) {
    throw GgufError("key '" + key + "' has type " + gguf_type_name(v.type) + ", expected string");
  }
  return v.str;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufType::kArray || v.elem_type != GgufType::kString) {
    throw GgufError("key '" + key + "' is not an array of strings");
  }
  std::vector<std::string> out;
  out.reserve(v.items.size());
  for (const GgufValue& item : v.items) out.push_back(item.str);
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufType::kArray) throw GgufError("key '" + key + "' is not an array");
  std::vector<int64_t> out;
  out.reserve(v.items.size());
  for (const GgufValue& item : v.items) out.push_back(item.as_int(key));
  return out;
}

const TensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& GgufFile::tensor(const std::string& name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) throw GgufError("missing tensor '" + name + "'");
  return *t;
}

const uint8_t* GgufFile::tensor_data(const TensorInfo& info) const {
  return bytes_.data() + data_offset_ + info.offset;
}

}  // namespace kvpack::llama
