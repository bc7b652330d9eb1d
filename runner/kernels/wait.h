// Waiting for another thread or process to get somewhere: spin briefly (the wait is usually
// short, and a spinning core answers within nanoseconds), then yield the core at every check, so
// that a peer the scheduler preempted, perhaps onto this very core, gets to run.
#pragma once

#include <sched.h>

#include <cstdint>

namespace runner {

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Backoff {
 public:
  // Wait a little; returns how many waits so far.
  int64_t operator()() {
    if (waits_ < kSpins)
      spin_pause();
    else
      sched_yield();
    return ++waits_;
  }

 private:
  static constexpr int64_t kSpins = 1024;  // pauses before the first yield: tens of microseconds
  int64_t waits_ = 0;
};

}  // namespace runner
