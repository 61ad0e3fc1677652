//! Compiles the one piece of C++ the store needs: the memtable's insert
//! hints (`src/store/user_hint.cc`), against the headers of the
//! RocksDB that `librocksdb-sys` builds and links.

fn main() {
    let rocksdb = std::env::var("DEP_ROCKSDB_CARGO_MANIFEST_DIR")
        .expect("librocksdb-sys exports its source directory (links = \"rocksdb\")");
    println!("cargo:rerun-if-changed=src/store/user_hint.cc");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .define("NDEBUG", "1")
        .include(format!("{rocksdb}/rocksdb/include"))
        .file("src/store/user_hint.cc")
        .warnings(true)
        .compile("swiftlet_user_hint");
}
