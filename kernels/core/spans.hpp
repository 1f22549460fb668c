// Which tokens of an encoding fall in each character span of its text (tokens.py `_tokens_in` is
// the reference and states the rules).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace lmcor {

using Offsets = std::vector<std::pair<int64_t, int64_t>>;

// For each span, the indices of the tokens that overlap it: special tokens left out, a token over
// two spans counted for the first, a token with an empty offset (white space a byte-level
// post-processor trimmed) counted where it sits. Tokens in text order are found by bisection.
// `special` holds one flag per offset.
inline std::vector<std::vector<int64_t>> tokens_in(const Offsets& offsets, const std::vector<int64_t>& special,
                                                   const Offsets& spans) {
  std::vector<int64_t> tokens, start, end;
  for (size_t i = 0; i < offsets.size(); ++i) {
    if (special[i] != 0) continue;
    tokens.push_back(static_cast<int64_t>(i));
    start.push_back(offsets[i].first);
    end.push_back(offsets[i].second);
  }
  const size_t n = tokens.size();
  bool ordered = true;
  for (size_t i = 1; i < n && ordered; ++i) ordered = start[i] >= start[i - 1] && end[i] >= end[i - 1];
  std::vector<char> taken(n, 0);
  std::vector<std::vector<int64_t>> inside(spans.size());
  for (size_t s = 0; s < spans.size(); ++s) {
    const int64_t from = spans[s].first, to = spans[s].second;
    size_t lo = 0, hi = n;
    if (ordered) {
      lo = static_cast<size_t>(std::upper_bound(end.begin(), end.end(), from) - end.begin());
      hi = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), to) - start.begin());
    }
    for (size_t i = lo; i < hi; ++i) {
      if (taken[i]) continue;
      const bool hit = end[i] == start[i] ? start[i] > from && start[i] <= to : start[i] < to && end[i] > from;
      if (hit) {
        taken[i] = 1;
        inside[s].push_back(tokens[i]);
      }
    }
  }
  return inside;
}

}  // namespace lmcor
