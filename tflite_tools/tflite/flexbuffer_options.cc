// Bounds-checked FlexBuffer map reader (see flexbuffer_options.h).
//
// Format facts used (FlexBuffers, little endian): the buffer ends with the root value
// (root_width bytes), its packed type byte and root_width. A packed type is
// (type << 2) | log2(width). Offsets are unsigned and point backwards from where they are
// stored. A map at p with element width w stores [keys offset][keys width][length] at
// p - 3w .. p - w, its values at p + i*w and one packed type byte per value after them;
// the keys vector (width kw) stores its length at k - kw and offsets to NUL-terminated key
// strings at k + i*kw. Direct scalars are read at the map's width, indirect ones (an
// offset at the map's width) at the width of their packed type.
#include "flexbuffer_options.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

namespace n2uq {
namespace {

enum {
  kTypeInt = 1, kTypeUInt = 2, kTypeFloat = 3, kTypeIndirectInt = 6, kTypeIndirectUInt = 7,
  kTypeIndirectFloat = 8, kTypeMap = 9, kTypeBool = 26
};

struct Reader {
  const uint8_t* data;
  size_t size;
  std::string* error;

  bool Fail(const std::string& message) {
    if (error) *error = "malformed custom options (FlexBuffer): " + message;
    return false;
  }
  static bool ValidWidth(uint64_t w) { return w == 1 || w == 2 || w == 4 || w == 8; }

  bool UInt(size_t pos, uint64_t width, uint64_t* out) {
    if (!ValidWidth(width)) return Fail("invalid byte width " + std::to_string(width));
    if (pos > size || size - pos < width) return Fail("read past the end of the buffer");
    uint64_t v = 0;
    for (uint64_t b = 0; b < width; ++b) v |= static_cast<uint64_t>(data[pos + b]) << (8 * b);
    *out = v;
    return true;
  }
  bool Int(size_t pos, uint64_t width, int64_t* out) {
    uint64_t v;
    if (!UInt(pos, width, &v)) return false;
    if (width < 8 && (v >> (8 * width - 1)) & 1) v |= ~0ull << (8 * width);  // sign-extend
    memcpy(out, &v, sizeof(v));
    return true;
  }
  bool Float(size_t pos, uint64_t width, double* out) {
    uint64_t v;
    if (width != 4 && width != 8) return Fail("a float needs 4 or 8 bytes, got " + std::to_string(width));
    if (!UInt(pos, width, &v)) return false;
    if (width == 4) {
      uint32_t bits = static_cast<uint32_t>(v);
      float f;
      memcpy(&f, &bits, sizeof(f));
      *out = f;
    } else {
      memcpy(out, &v, sizeof(v));
    }
    return true;
  }
  // Follows a backward offset stored at pos (width bytes).
  bool Deref(size_t pos, uint64_t width, size_t* target) {
    uint64_t offset;
    if (!UInt(pos, width, &offset)) return false;
    if (offset > pos) return Fail("offset points before the start of the buffer");
    *target = pos - static_cast<size_t>(offset);
    return true;
  }
};

}  // namespace

bool FlexOptions::Parse(const uint8_t* data, size_t size, std::string* error) {
  entries_.clear();
  Reader r{data, size, error};
  if (data == nullptr || size < 3) return r.Fail("buffer of " + std::to_string(size) + " bytes is too short");
  const uint64_t root_width = data[size - 1];
  const uint8_t root_packed = data[size - 2];
  if (!Reader::ValidWidth(root_width)) return r.Fail("invalid root byte width " + std::to_string(root_width));
  if (size < 2 + root_width) return r.Fail("buffer too short for its root");
  if ((root_packed >> 2) != kTypeMap) return r.Fail("root is not a map (type " + std::to_string(root_packed >> 2) + ")");
  const uint64_t w = 1ull << (root_packed & 3);
  const size_t root_pos = size - 2 - root_width;
  size_t map;
  if (!r.Deref(root_pos, root_width, &map)) return false;
  if (map < 3 * w) return r.Fail("map header before the start of the buffer");
  uint64_t length, keys_width;
  size_t keys;
  if (!r.UInt(map - w, w, &length) || !r.UInt(map - 2 * w, w, &keys_width) || !r.Deref(map - 3 * w, w, &keys))
    return false;
  if (!Reader::ValidWidth(keys_width)) return r.Fail("invalid key vector width " + std::to_string(keys_width));
  // Values (w bytes each) then one type byte each must fit after the map start.
  if (map > size || length > (size - map) / (w + 1)) return r.Fail("map of " + std::to_string(length) +
                                                                    " entries runs past the end of the buffer");
  const size_t types = map + static_cast<size_t>(length * w);
  if (keys < keys_width) return r.Fail("key vector header before the start of the buffer");
  uint64_t keys_length;
  if (!r.UInt(keys - keys_width, keys_width, &keys_length)) return false;
  if (keys_length != length) return r.Fail("key count " + std::to_string(keys_length) + " != value count " +
                                           std::to_string(length));
  if (keys > size || length > (size - keys) / keys_width) return r.Fail("key vector runs past the end of the buffer");
  entries_.reserve(static_cast<size_t>(length));
  for (size_t i = 0; i < length; ++i) {
    Entry entry;
    size_t key;
    if (!r.Deref(keys + i * keys_width, keys_width, &key)) return false;
    if (key >= size) return r.Fail("key string outside the buffer");
    const void* nul = memchr(data + key, 0, size - key);
    if (nul == nullptr) return r.Fail("key string is not terminated");
    entry.key.assign(reinterpret_cast<const char*>(data + key), static_cast<const uint8_t*>(nul) - (data + key));
    const uint8_t packed = data[types + i];
    const unsigned type = packed >> 2;
    const uint64_t width = 1ull << (packed & 3);
    const size_t value = map + i * w;
    size_t target = value;
    uint64_t read_width = w;
    if (type == kTypeIndirectInt || type == kTypeIndirectUInt || type == kTypeIndirectFloat) {
      if (!r.Deref(value, w, &target)) return false;
      read_width = width;
    }
    bool ok = true;
    switch (type) {
      case kTypeInt:
      case kTypeIndirectInt:
        entry.kind = kInt;
        ok = r.Int(target, read_width, &entry.i);
        break;
      case kTypeUInt:
      case kTypeIndirectUInt:
        entry.kind = kUInt;
        ok = r.UInt(target, read_width, &entry.u);
        break;
      case kTypeFloat:
      case kTypeIndirectFloat:
        entry.kind = kFloat;
        ok = r.Float(target, read_width, &entry.f);
        break;
      case kTypeBool: {
        uint64_t v;
        entry.kind = kBool;
        ok = r.UInt(target, read_width, &v);
        entry.i = v != 0;
        break;
      }
      default:
        entry.kind = kOther;  // strings, vectors, nested maps: not used by the N2UQ ops
    }
    if (!ok) return false;
    entries_.push_back(entry);
  }
  return true;
}

const FlexOptions::Entry* FlexOptions::Find(const char* key) const {
  for (const Entry& e : entries_)
    if (e.key == key) return &e;
  return nullptr;
}

bool FlexOptions::GetInt(const char* key, int64_t lo, int64_t hi, int64_t* out, std::string* error) const {
  const Entry* e = Find(key);
  if (e == nullptr) {
    *error = std::string("missing option '") + key + "'";
    return false;
  }
  int64_t v;
  if (e->kind == kInt || e->kind == kBool) {
    v = e->i;
  } else if (e->kind == kUInt && e->u <= static_cast<uint64_t>(INT64_MAX)) {
    v = static_cast<int64_t>(e->u);
  } else if (e->kind == kUInt) {
    v = INT64_MAX;
  } else {
    *error = std::string("option '") + key + "' must be an integer";
    return false;
  }
  if (v < lo || v > hi) {
    *error = std::string("option '") + key + "' = " + std::to_string(v) + " is out of range [" +
             std::to_string(lo) + ", " + std::to_string(hi) + "]";
    return false;
  }
  *out = v;
  return true;
}

bool FlexOptions::GetFloat(const char* key, double* out, std::string* error) const {
  const Entry* e = Find(key);
  if (e == nullptr) {
    *error = std::string("missing option '") + key + "'";
    return false;
  }
  double v;
  if (e->kind == kFloat) v = e->f;
  else if (e->kind == kInt) v = static_cast<double>(e->i);
  else if (e->kind == kUInt) v = static_cast<double>(e->u);
  else {
    *error = std::string("option '") + key + "' must be a number";
    return false;
  }
  if (!isfinite(v)) {
    *error = std::string("option '") + key + "' is not finite";
    return false;
  }
  *out = v;
  return true;
}

}  // namespace n2uq

extern "C" __attribute__((visibility("default"))) int n2uq_flexbuffer_dump(const uint8_t* data, size_t size, char* out, size_t out_len) {
  n2uq::FlexOptions options;
  std::string error, text;
  int status = 0;
  if (!options.Parse(data, size, &error)) {
    text = error;
    status = -1;
  } else {
    static const char* const kinds[] = {"int", "uint", "float", "bool", "other"};
    char value[64];
    for (const auto& e : options.entries()) {
      switch (e.kind) {
        case n2uq::FlexOptions::kInt:
        case n2uq::FlexOptions::kBool: snprintf(value, sizeof(value), "%lld", static_cast<long long>(e.i)); break;
        case n2uq::FlexOptions::kUInt: snprintf(value, sizeof(value), "%llu", static_cast<unsigned long long>(e.u)); break;
        case n2uq::FlexOptions::kFloat: snprintf(value, sizeof(value), "%.17g", e.f); break;
        default: value[0] = 0;
      }
      text += e.key + "=" + kinds[e.kind] + ":" + value + "\n";
    }
  }
  if (out != nullptr && out_len > 0) {
    size_t n = text.size() < out_len - 1 ? text.size() : out_len - 1;
    memcpy(out, text.data(), n);
    out[n] = 0;
  }
  return status;
}
