// Decode attention of one KV group per layer, two ways, in one process (issue 18, session 16): the heads
// two at a time (attention.h attend_heads_v<8, 2>, what a group of 6 heads of 128 took before) against
// all of the group at once (attend_group_v<8, 6>), on an fp16 cache of P positions in each of 28 layers,
// Qwen2.5-Coder-1.5B's shape. `cold` walks a 400 MB buffer before every call so the cache comes from
// memory, as in decode (the weights' stream evicts it from L3 every token); `warm` does not. Alternating
// turns, thread CPU time, one thread. Prints medians, 10th percentiles and the largest difference of
// the two outputs; asserts nothing. Build and run from the repository root (any output folder):
//
//   g++ -O3 -march=native -fopenmp -std=c++17 -Isrc/bitsmith/kernels/csrc bench/attention_ab.cpp -o attention_ab
//   OMP_NUM_THREADS=1 ./attention_ab cold 544      # or: warm, and another cached length
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attention.h"

namespace {

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

float uniform() { return rand() / (float)RAND_MAX - 0.5f; }

}  // namespace

int main(int argc, char** argv) {
#if defined(__AVX512F__)
  const bool cold = argc < 2 || argv[1][0] != 'w';
  const int64_t S = argc > 2 ? atol(argv[2]) : 544, D = 128, layers = 28, heads = 6, max_len = S + 16;
  std::vector<uint16_t> K(layers * max_len * D), V(layers * max_len * D);
  for (size_t i = 0; i < K.size(); ++i) K[i] = bs::float_to_half(uniform()), V[i] = bs::float_to_half(uniform());
  std::vector<float> q(heads * D), k_now(D), v_now(D), scores(heads * max_len), pairs(heads * D), group(heads * D);
  for (auto* v : {&q, &k_now, &v_now})
    for (auto& x : *v) x = uniform();
  std::vector<char> evict(cold ? 400 << 20 : 64, 1);
  std::vector<double> t_pairs, t_group;
  for (int turn = 0; turn < 60; ++turn) {
    const bool g = (turn % 2) ^ (turn / 2 % 2);  // ABBA
    if (cold)
      for (size_t i = 0; i < evict.size(); i += 64) evict[i]++;
    const double t0 = thread_seconds();
    for (int64_t l = 0; l < layers; ++l) {
      const uint16_t* Kl = K.data() + l * max_len * D;
      const uint16_t* Vl = V.data() + l * max_len * D;
      if (g)
        attend_group_v<8, 6>(q.data(), Kl, Vl, k_now.data(), v_now.data(), 0, S, 0.088f, scores.data(), max_len, group.data());
      else
        for (int c = 0; c < 3; ++c)
          attend_heads_v<8, 2>(q.data() + 2 * c * D, Kl, Vl, k_now.data(), v_now.data(), 0, S, 0.088f,
                               scores.data() + 2 * c * max_len, max_len, pairs.data() + 2 * c * D);
    }
    (g ? t_group : t_pairs).push_back(thread_seconds() - t0);
  }
  float diff = 0.f;
  for (int64_t i = 0; i < heads * D; ++i) diff = std::max(diff, std::abs(pairs[i] - group[i]));
  std::sort(t_pairs.begin(), t_pairs.end());
  std::sort(t_group.begin(), t_group.end());
  const size_t mid = t_pairs.size() / 2, p10 = t_pairs.size() / 10;
  printf("%s cache, %ld positions x %ld layers: 2 heads at a time %.0f us (p10 %.0f), 6 at once %.0f us (p10 %.0f), "
         "ratio %.3f; largest output difference %.1e\n", cold ? "cold" : "warm", (long)S, (long)layers, 1e6 * t_pairs[mid],
         1e6 * t_pairs[p10], 1e6 * t_group[mid], 1e6 * t_group[p10], t_group[mid] / t_pairs[mid], diff);
#else
  (void)argc, (void)argv;
  printf("attend_group_v needs AVX-512; this build has none\n");
#endif
  return 0;
}
