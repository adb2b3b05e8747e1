// flexbuffer_options.h: a bounds-checked reader of the FlexBuffer map of scalars that the
// TFLite converter writes as a custom op's options (written from the FlexBuffers format
// description; no flatbuffers code is used or copied).
//
// Parse() walks the root map once and copies every scalar entry (int, uint, float, bool,
// direct or indirect, any byte width 1/2/4/8) into a small table; later lookups never touch
// the raw bytes again. Every read is checked against the buffer size, so malformed or
// truncated bytes give an error message, never an out-of-bounds read.
#ifndef N2UQ_FLEXBUFFER_OPTIONS_H_
#define N2UQ_FLEXBUFFER_OPTIONS_H_

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace n2uq {

class FlexOptions {
 public:
  enum Kind { kInt, kUInt, kFloat, kBool, kOther };
  struct Entry {
    std::string key;
    Kind kind = kOther;
    int64_t i = 0;   // kInt, kBool
    uint64_t u = 0;  // kUInt
    double f = 0.0;  // kFloat
  };

  // Parses `size` bytes at `data` (NULL only with size 0, which is an error: no map).
  bool Parse(const uint8_t* data, size_t size, std::string* error);

  bool Has(const char* key) const { return Find(key) != nullptr; }
  // Integer option (int, uint or bool entry) within [lo, hi]; otherwise false with a message.
  bool GetInt(const char* key, int64_t lo, int64_t hi, int64_t* out, std::string* error) const;
  // Float option (float, int or uint entry), finite; otherwise false with a message.
  bool GetFloat(const char* key, double* out, std::string* error) const;
  const std::vector<Entry>& entries() const { return entries_; }

 private:
  const Entry* Find(const char* key) const;
  std::vector<Entry> entries_;
};

}  // namespace n2uq

extern "C" {
// Test/inspection hook: parses a FlexBuffer map and writes "key=kind:value\n" lines
// (kind: int, uint, float, bool, other) into out. Returns 0, or -1 with the error in out.
int n2uq_flexbuffer_dump(const uint8_t* data, size_t size, char* out, size_t out_len);
}

#endif  // N2UQ_FLEXBUFFER_OPTIONS_H_
