// ppml::cpu::parallel_run on OpenMP, sharing torch's runtime and thread team (see parallel.h).
#include <omp.h>

#include <thread>

#include "parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PPML_PAUSE() _mm_pause()
#else
#define PPML_PAUSE() std::this_thread::yield()
#endif

namespace ppml::cpu {

void parallel_run(int num_threads, const std::function<void(int, int)>& fn, Barrier* barrier) {
  if (num_threads <= 1 || omp_in_parallel()) {
    if (barrier) barrier->reset(1);
    fn(0, 1);
    return;
  }
  int got = 0;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp single
    {
      got = omp_get_num_threads();
      if (barrier) barrier->reset(got);
    }
    // the implicit barrier after single publishes `got` and the barrier's size
    fn(omp_get_thread_num(), got);
  }
}

void Barrier::wait() {
  int my_sense = 1 - sense_.load(std::memory_order_relaxed);
  if (count_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    count_.store(n_, std::memory_order_relaxed);
    sense_.store(my_sense, std::memory_order_release);
    return;
  }
  int spins = 0;
  while (sense_.load(std::memory_order_acquire) != my_sense) {
    if (++spins < 4096) {
      PPML_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace ppml::cpu
