#pragma once
// Builds small GGUF images in memory for the reader tests, remembering where each field went so
// that tests can corrupt exactly one of them.

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace kvpack::test {

class GgufWriter {
 public:
  std::vector<uint8_t> bytes;
  std::map<std::string, size_t> marks;  // field name -> byte offset

  void mark(const std::string& name) { marks[name] = bytes.size(); }

  template <typename T>
  void put(T v) {
    const size_t at = bytes.size();
    bytes.resize(at + sizeof(T));
    std::memcpy(bytes.data() + at, &v, sizeof(T));
  }
  void put_string(const std::string& s) {
    put<uint64_t>(s.size());
    bytes.insert(bytes.end(), s.begin(), s.end());
  }
  void pad_to(size_t alignment) {
    while (bytes.size() % alignment != 0) bytes.push_back(0);
  }

  void header(uint32_t version, uint64_t tensors, uint64_t kvs) {
    bytes.insert(bytes.end(), {'G', 'G', 'U', 'F'});
    mark("version");
    put<uint32_t>(version);
    mark("tensor_count");
    put<uint64_t>(tensors);
    mark("kv_count");
    put<uint64_t>(kvs);
  }
  /// Key and type; the caller then writes the value.
  void key(const std::string& k, uint32_t type) {
    mark("key:" + k);
    put_string(k);
    mark("type:" + k);
    put<uint32_t>(type);
    mark("value:" + k);
  }
  void tensor_info(const std::string& name, const std::vector<uint64_t>& dims, uint32_t type,
                   uint64_t offset) {
    mark("tensor:" + name);
    put_string(name);
    mark("n_dims:" + name);
    put<uint32_t>(static_cast<uint32_t>(dims.size()));
    mark("dims:" + name);
    for (uint64_t d : dims) put<uint64_t>(d);
    mark("ttype:" + name);
    put<uint32_t>(type);
    mark("offset:" + name);
    put<uint64_t>(offset);
  }

  template <typename T>
  void patch(const std::string& field, T v, size_t extra = 0) {
    std::memcpy(bytes.data() + marks.at(field) + extra, &v, sizeof(T));
  }
};

}  // namespace kvpack::test
