// The memtable's insert hints: one per owner of a key, bounded in number.
//
// RocksDB can start a memtable insert from where the last insert with the
// same "prefix" ended (`memtable_insert_with_hint_prefix_extractor`),
// instead of walking the skiplist down from its top. Inbox, dedup and
// cursor keys are `user ‖ 0x00 ‖ …` (see `cf.rs`), and a user's rows arrive
// in order, so a hint per user turns a busy user's inserts into
// near-appends. The transform below is used for that option only: its
// "prefix" names a hint, it is not a prefix of the key, and it must never
// serve as a column family's `prefix_extractor` (bloom filters, seeks).
// RocksDB's built-in transforms cut fixed or capped lengths, which user
// ids are not, and the option can only be set by name (the C API has no
// setter), so this file registers the transform as `swiftlet.UserHint` in
// RocksDB's object library, where `GetOptionsFromString` finds it.

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "rocksdb/slice.h"
#include "rocksdb/slice_transform.h"
#include "rocksdb/utilities/object_registry.h"

namespace {

using ROCKSDB_NAMESPACE::ObjectLibrary;
using ROCKSDB_NAMESPACE::Slice;
using ROCKSDB_NAMESPACE::SliceTransform;

// How many hints a memtable keeps at most. RocksDB keeps one skiplist
// splice (232 bytes) and one hash-map entry per distinct prefix in each
// memtable, freed with it. One per user would cost a big node, where most
// users have a row or two in a memtable, more memory than their rows
// (measured: 794 bytes of memtable per message instead of 480 with a
// million users) and more time than the hint saves. Users are therefore
// hashed into 1,024 hints, about 290 KB a memtable at most: a node's
// busiest users, those whose rows recur in a memtable, mostly have one to
// themselves, and a hint shared by users who seldom write costs what no
// hint costs (the insert walks down from where the splice stops fitting).
constexpr size_t kHints = 1024;

// The hints' names, two bytes each. A prefix RocksDB keeps must stay
// valid as long as its memtable; these are static.
struct HintNames {
  char bytes[kHints * 2];
  constexpr HintNames() : bytes() {
    for (size_t i = 0; i < kHints; ++i) {
      bytes[2 * i] = static_cast<char>(i >> 8);
      bytes[2 * i + 1] = static_cast<char>(i & 0xff);
    }
  }
};
constexpr HintNames kHintNames;

// Which hint a key takes: a hash of its owner, the bytes before its first
// NUL (FNV-1a, 64 bits).
class UserHint : public SliceTransform {
 public:
  static const char* kClassName() { return "swiftlet.UserHint"; }
  const char* Name() const override { return kClassName(); }

  Slice Transform(const Slice& key) const override {
    const char* nul =
        static_cast<const char*>(std::memchr(key.data(), 0, key.size()));
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char* p = key.data(); p != nul; ++p) {
      h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ULL;
    }
    return Slice(kHintNames.bytes + 2 * (h % kHints), 2);
  }

  // Keys without a NUL take RocksDB's plain insert.
  bool InDomain(const Slice& key) const override {
    return std::memchr(key.data(), 0, key.size()) != nullptr;
  }
};

}  // namespace

// Registers `swiftlet.UserHint`; idempotent and thread-safe.
extern "C" void swiftlet_register_user_hint() {
  static std::once_flag once;
  std::call_once(once, [] {
    ObjectLibrary::Default()->AddFactory<const SliceTransform>(
        UserHint::kClassName(),
        [](const std::string& /*uri*/,
           std::unique_ptr<const SliceTransform>* guard,
           std::string* /*errmsg*/) {
          guard->reset(new UserHint());
          return guard->get();
        });
  });
}
