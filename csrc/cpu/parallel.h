// Threads of the CPU kernels: torch's own OpenMP team.
//
// The extension links libgomp.so.1 by soname and is always loaded after torch, whose wheel
// ships libgomp.so.1: the loader binds us to torch's copy, so the process has one OpenMP
// runtime, and a kernel reuses the team of the calling thread that torch's ops just used.
// Why not a private pool: after each torch op, torch's OpenMP workers keep spinning (the
// default wait policy), and a second pool competes with them for the cores. Measured on 2 cores
// (bench/bench_threading.py, bench/RESULTS.md): a torch matmul alternating with
// clip_and_accumulate cost 1.27-1.35x the sum of both alone with a private condition-variable
// pool, and 0.98-0.99x on torch's team.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace ppml::cpu {

class Barrier;

// Runs fn(thread_index, num_threads) on up to num_threads threads, the caller being thread 0,
// and returns when all have finished. fn must split its work by (thread_index, num_threads)
// alone: OpenMP may grant fewer threads, and inside an OpenMP region fn runs as fn(0, 1).
// A barrier used by fn is passed here so that it is sized to the threads actually granted.
void parallel_run(int num_threads, const std::function<void(int, int)>& fn,
                  Barrier* barrier = nullptr);

// Sense-reversing barrier for the threads of one parallel_run job: they spin (then yield)
// only while all of them are inside the job.
class Barrier {
 public:
  explicit Barrier(int n = 1) : n_(n), count_(n), sense_(0) {}
  void reset(int n) {
    n_ = n;
    count_.store(n, std::memory_order_relaxed);
  }
  void wait();

 private:
  int n_;
  std::atomic<int> count_;
  std::atomic<int> sense_;
};

// Contiguous share [begin, end) of n items for thread t of nt.
inline void split_range(int64_t n, int t, int nt, int64_t* begin, int64_t* end) {
  *begin = n * t / nt;
  *end = n * (t + 1) / nt;
}

}  // namespace ppml::cpu
