// The CPU kernels' own thread pool.
//
// Why not OpenMP: torch's wheel brings its own OpenMP runtime; a second one (or the same one
// with an active wait policy) spin-waits against torch between our calls and a DP step
// alternates torch ops and ours every few milliseconds (DESIGN.md, "Measured pitfalls").
// These workers sleep on a condition variable between jobs and never spin while idle; they
// spin only inside a job, at the barrier between a kernel's two phases, while every worker of
// that job is running.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace ppml::cpu {

// Runs fn(thread_index, num_threads) on num_threads threads, the caller being thread 0, and
// returns when all have finished. fn must split its work by (thread_index, num_threads) alone.
// If the pool is busy (another Python thread is inside a kernel), fn runs on the caller alone
// as fn(0, 1).
void parallel_run(int num_threads, const std::function<void(int, int)>& fn);

// Sense-reversing barrier for the threads of one parallel_run job.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n), count_(n), sense_(0) {}
  void wait();

 private:
  const int n_;
  std::atomic<int> count_;
  std::atomic<int> sense_;
};

// Contiguous share [begin, end) of n items for thread t of nt.
inline void split_range(int64_t n, int t, int nt, int64_t* begin, int64_t* end) {
  *begin = n * t / nt;
  *end = n * (t + 1) / nt;
}

}  // namespace ppml::cpu
