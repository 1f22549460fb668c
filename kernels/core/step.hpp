// The host work of one greedy decode step after the decoder call: `generate`'s logits processors
// (n-gram bans, min length, forced BOS/EOS) fused with argmax and draft acceptance, and the per-row
// writes of new keys/values into the ragged decoder's cache.
// References: runtime/sequence.py (`RepeatBan`), runtime/decode.py (`_constrain`, `accept`,
// `RaggedDecoder.step`).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace lmcor {

// `no_repeat_ngram_size`: the tokens that would repeat an n-gram of one sequence (which starts with
// the decoder start token). The (n-1)-grams written so far are indexed by hash; every hit is
// checked token by token, so a collision costs a comparison, never a wrong ban.
class RepeatBan {
 public:
  RepeatBan(int64_t size, int64_t start) : size(size), seq{start} {
    if (size == 1) next_[hash(seq.data(), 0)].push_back(0);  // the start token is a 1-gram too
  }

  void extend(const int64_t* tokens, size_t count) {
    for (size_t t = 0; t < count; ++t) {
      seq.push_back(tokens[t]);
      if (static_cast<int64_t>(seq.size()) >= size) {
        size_t i = seq.size() - static_cast<size_t>(size);  // the (n-1)-gram before the new token
        next_[hash(seq.data() + i, size - 1)].push_back(static_cast<int32_t>(i));
      }
    }
  }

  // Banned next tokens after the sequence followed by `extra` (not yet written), in the
  // reference's order, appended to `out`.
  void banned(const int64_t* extra, size_t count, std::vector<int64_t>& out) const {
    const size_t written = seq.size(), total = written + count;
    const int64_t n = size;
    if (static_cast<int64_t>(total) + 1 < n) return;
    auto at = [&](size_t j) { return j < written ? seq[j] : extra[j - written]; };
    const size_t tail = total - static_cast<size_t>(n - 1);  // where the last n-1 tokens start
    uint64_t key = kSeed;
    for (size_t j = tail; j < total; ++j) key = mix(key, at(j));
    auto found = next_.find(key);
    if (found != next_.end())
      for (int32_t i : found->second)
        if (same(static_cast<size_t>(i), tail, n - 1, at)) out.push_back(seq[i + n - 1]);
    // n-grams that reach into `extra`
    size_t from = written + 1 > static_cast<size_t>(n) ? written - static_cast<size_t>(n) + 1 : 0;
    for (size_t i = from; i + static_cast<size_t>(n) <= total; ++i)
      if (same(i, tail, n - 1, at)) out.push_back(at(i + n - 1));
  }

  int64_t size;
  std::vector<int64_t> seq;

 private:
  static constexpr uint64_t kSeed = 1469598103934665603ull;
  static uint64_t mix(uint64_t h, int64_t token) {
    h ^= static_cast<uint64_t>(token) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h * 1099511628211ull;
  }
  static uint64_t hash(const int64_t* tokens, int64_t count) {
    uint64_t h = kSeed;
    for (int64_t j = 0; j < count; ++j) h = mix(h, tokens[j]);
    return h;
  }
  template <class At>
  static bool same(size_t i, size_t j, int64_t count, const At& at) {
    for (int64_t k = 0; k < count; ++k)
      if (at(i + k) != at(j + k)) return false;
    return true;
  }
  std::unordered_map<uint64_t, std::vector<int32_t>> next_;
};

// np.argmax, one element at a time, of the values `at(j)` for j < n: the first maximum; the first
// NaN where there is one.
template <class At>
inline int64_t argmax_scan(int64_t n, const At& at) {
  int64_t best = 0;
  float top = at(0);
  if (std::isnan(top)) return 0;
  for (int64_t j = 1; j < n; ++j) {
    float v = at(j);
    if (v > top) {
      top = v;
      best = j;
    } else if (std::isnan(v)) {
      return j;
    }
  }
  return best;
}

inline int64_t argmax_scalar(const float* x, int64_t n) {
  return argmax_scan(n, [x](int64_t j) { return x[j]; });
}

// np.argmax, vectorized: each block's maximum (and whether it holds a NaN) in SIMD lanes, then the
// first element equal to the first block's maximum that no later block exceeds. Rows with a NaN go
// to the scalar scan, which returns the first NaN as NumPy does.
inline int64_t argmax(const float* x, int64_t n) {
  constexpr int64_t kBlock = 512;
  float top = 0.0f;
  int64_t where = -1;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = b; j < e; ++j) {
      const float v = x[j];
      m = v > m ? v : m;
      nan |= v != v;
    }
    if (nan) return argmax_scalar(x, n);
    if (where < 0 || m > top) {
      top = m;
      where = b;
    }
  }
  while (x[where] != top) ++where;
  return where;
}

// np.argmax of `x` with the tokens marked in `masked` read as -inf.
inline int64_t argmax_masked(const float* x, int64_t n, const uint8_t* masked) {
  return argmax_scan(n, [x, masked](int64_t j) { return masked[j] ? -INFINITY : x[j]; });
}

struct Specials {
  int64_t eos, forced_bos, forced_eos;  // forced_*: -1 where the model has none
};

// The token `generate` chooses from one score vector at `cur_len` (the start token counted): its
// bans and the min-length EOS ban read as -inf, a forced token chosen outright. `scratch` holds
// the banned tokens; `mask` is vocab-sized zeros, left as zeros.
inline int64_t choose(const float* scores, int64_t vocab, int64_t cur_len, int64_t least, int64_t most,
                      const Specials& sp, const RepeatBan* ban, const int64_t* extra, size_t count,
                      std::vector<int64_t>& scratch, std::vector<uint8_t>& mask) {
  int64_t forced = -1;
  if (sp.forced_bos >= 0 && cur_len == 1) forced = sp.forced_bos;
  if (sp.forced_eos >= 0 && cur_len == most) forced = sp.forced_eos;
  if (forced >= 0) return forced;
  scratch.clear();
  if (ban) ban->banned(extra, count, scratch);
  if (cur_len - 1 < least) scratch.push_back(sp.eos);
  int64_t best = argmax(scores, vocab);
  bool hit = false;
  for (int64_t t : scratch) hit = hit || t == best;
  if (!hit) return best;  // lowering other scores cannot move the first maximum
  for (int64_t t : scratch)
    if (t >= 0 && t < vocab) mask[t] = 1;
  best = argmax_masked(scores, vocab, mask.data());
  for (int64_t t : scratch)
    if (t >= 0 && t < vocab) mask[t] = 0;
  return best;
}

// One row's acceptance: the longest draft prefix equal to the model's own choices, then the model's
// next token. `draft` holds `drafted` tokens; returns the accepted count, the next token in `next`.
inline int64_t accept_row(const float* logits, int64_t positions, int64_t vocab, const int64_t* draft,
                          int64_t drafted, int64_t written, int64_t least, int64_t most, const Specials& sp,
                          const RepeatBan* ban, int64_t& next, std::vector<int64_t>& scratch,
                          std::vector<uint8_t>& mask) {
  int64_t k = 0;
  for (;; ++k) {
    next = choose(logits + k * vocab, vocab, written + 1 + k, least, most, sp, ban, draft, static_cast<size_t>(k),
                  scratch, mask);
    if (k >= drafted || k + 1 >= positions || next != draft[k]) break;
  }
  return k;
}

}  // namespace lmcor
