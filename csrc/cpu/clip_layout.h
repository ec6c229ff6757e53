// The column layout of the CPU clipping kernel (clip_accumulate.cpp): rows split into chunks of
// kChunk elements that never cross a segment, the share of chunks each thread owns, and the
// cache budget of the two-pass kernel's row blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "../include/ppml/kernels.h"

namespace ppml::cpu {
namespace {

struct Chunk {
  int seg;
  int64_t start;
  int64_t len;
};

// Bytes of rows per block of the two-pass kernel: PPML_FAST_BLOCK_BYTES when set (tests use it
// to force many blocks), else a quarter of the last-level cache read from sysfs (sysconf's
// _SC_LEVEL3_CACHE_SIZE reported 256 MiB for this VM's 32 MiB L3), else 8 MiB.
int64_t block_budget_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("PPML_FAST_BLOCK_BYTES")) {
      long long v = std::atoll(env);
      if (v > 0) return static_cast<int64_t>(v);
    }
    int64_t llc = 0;
    for (int index = 0; index < 8; ++index) {
      std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
      int level = 0;
      std::string size;
      if (!(level_file >> level) || !(size_file >> size) || size.empty()) continue;
      int64_t v = std::atoll(size.c_str());
      const char unit = size.back();
      if (unit == 'K') v <<= 10;
      if (unit == 'M') v <<= 20;
      if (level >= 2 && v > llc) llc = v;
    }
    if (llc <= 0) llc = int64_t(32) << 20;
    return std::max<int64_t>(int64_t(1) << 20, llc / 4);
  }();
  return bytes;
}

// Column chunks of all segments, and the share of them that each thread owns.
struct Layout {
  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_begin_elems;  // elements before each chunk
  std::vector<int> seg_first_chunk;        // L + 1 entries
  int64_t total = 0;                       // elements per row
  int64_t C = 0;

  explicit Layout(const std::vector<int64_t>& widths) : seg_first_chunk(widths.size() + 1, 0) {
    for (size_t l = 0; l < widths.size(); ++l) {
      seg_first_chunk[l] = static_cast<int>(chunks.size());
      for (int64_t s = 0; s < widths[l]; s += kChunk) {
        chunks.push_back({static_cast<int>(l), s, std::min(kChunk, widths[l] - s)});
        chunk_begin_elems.push_back(total);
        total += chunks.back().len;
      }
    }
    seg_first_chunk[widths.size()] = static_cast<int>(chunks.size());
    C = static_cast<int64_t>(chunks.size());
  }

  // chunks [*c0, *c1) of thread t of nt, balanced by elements
  void share(int t, int nt, int64_t* c0, int64_t* c1) const {
    const int64_t e0 = total * t / nt, e1 = total * (t + 1) / nt;
    *c0 = std::lower_bound(chunk_begin_elems.begin(), chunk_begin_elems.end(), e0) -
          chunk_begin_elems.begin();
    *c1 = (t == nt - 1) ? C
                        : std::lower_bound(chunk_begin_elems.begin(), chunk_begin_elems.end(), e1) -
                              chunk_begin_elems.begin();
  }
};

}  // namespace
}  // namespace ppml::cpu
