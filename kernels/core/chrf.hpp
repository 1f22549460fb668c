// Sentence chrF as sacrebleu's default CHRF() computes it: character 1- to 6-grams of the text with
// whitespace removed, precision and recall averaged over the orders both texts have, beta 2.
// Reference: runtime/fallback.py (`char_ngrams`, `chrf`, `nearest`).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lmcor {

constexpr int kCharOrder = 6;
constexpr double kBeta = 2.0;

// An n-gram of up to 6 code points (21 bits each), packed exactly: 3 in `hi`, 3 in `lo`. Grams are
// only ever compared within one order, so equal keys are equal n-grams.
struct Gram {
  uint64_t hi, lo;
  bool operator<(const Gram& o) const { return hi < o.hi || (hi == o.hi && lo < o.lo); }
  bool operator==(const Gram& o) const { return hi == o.hi && lo == o.lo; }
};

// One text's n-grams of each order, sorted: the multiset `char_ngrams` counts.
class CharGrams {
 public:
  void build(const uint32_t* chars, size_t length) {
    for (int n = 1; n <= kCharOrder; ++n) {
      std::vector<Gram>& out = grams_[n - 1];
      out.clear();
      if (length < static_cast<size_t>(n)) continue;
      out.resize(length - n + 1);
      for (size_t i = 0; i + n <= length; ++i) {
        uint64_t hi = 0, lo = 0;
        for (int j = 0; j < n; ++j) {
          uint64_t c = chars[i + j];
          if (j < 3) hi |= c << (21 * j);
          else lo |= c << (21 * (j - 3));
        }
        out[i] = Gram{hi, lo};
      }
      std::sort(out.begin(), out.end());
    }
  }
  const std::vector<Gram>& order(int n) const { return grams_[n - 1]; }

 private:
  std::vector<Gram> grams_[kCharOrder];
};

// The size of the multiset intersection of two sorted gram lists: sum((hyp & ref).values()).
inline size_t common(const std::vector<Gram>& a, const std::vector<Gram>& b) {
  size_t i = 0, j = 0, m = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] < b[j]) ++i;
    else if (b[j] < a[i]) ++j;
    else { ++m; ++i; ++j; }
  }
  return m;
}

// Sentence chrF (0-100), the reference's arithmetic in its order (so that the doubles are equal).
inline double chrf(const CharGrams& hyp, const CharGrams& ref) {
  double precision = 0.0, recall = 0.0;
  int orders = 0;
  for (int n = 1; n <= kCharOrder; ++n) {
    size_t n_hyp = hyp.order(n).size(), n_ref = ref.order(n).size();
    if (n_hyp && n_ref) {
      double matches = static_cast<double>(common(hyp.order(n), ref.order(n)));
      precision += matches / static_cast<double>(n_hyp);
      recall += matches / static_cast<double>(n_ref);
      ++orders;
    }
  }
  if (!orders || precision + recall == 0.0) return 0.0;
  precision /= orders;
  recall /= orders;
  const double factor = kBeta * kBeta;
  return 100.0 * (1.0 + factor) * precision * recall / (factor * precision + recall);
}

}  // namespace lmcor
