// The candidates' edits to the source, voted: the source with every word-level edit that at least
// `need` candidates make. Words are ids whose order is the words' own order (the caller numbers the
// sorted vocabulary), so that ties break as in Python.
// Reference: runtime/vote.py (`_edit_vote_reference`), whose alignment is difflib.SequenceMatcher's
// with autojunk=False; `matching_blocks` and `opcodes` below compute the same blocks and opcodes
// (vote._opcodes and vote._ratio use them for the fallback's minimal edits).
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace lmcor {

using Words = std::vector<int32_t>;

struct Block {
  int64_t i, j, size;
  bool operator<(const Block& o) const { return std::tie(i, j, size) < std::tie(o.i, o.j, o.size); }
};

// difflib's find_longest_match without junk: the longest common run of a[alo:ahi] and b[blo:bhi],
// the earliest in a, then in b.
inline Block longest_match(const Words& a, const std::unordered_map<int32_t, std::vector<int64_t>>& b2j, int64_t alo,
                           int64_t ahi, int64_t blo, int64_t bhi) {
  Block best{alo, blo, 0};
  std::unordered_map<int64_t, int64_t> j2len, next;
  for (int64_t i = alo; i < ahi; ++i) {
    next.clear();
    auto found = b2j.find(a[i]);
    if (found != b2j.end()) {
      for (int64_t j : found->second) {
        if (j < blo) continue;
        if (j >= bhi) break;
        auto previous = j2len.find(j - 1);
        int64_t k = (previous == j2len.end() ? 0 : previous->second) + 1;
        next[j] = k;
        if (k > best.size) best = Block{i - k + 1, j - k + 1, k};
      }
    }
    std::swap(j2len, next);
  }
  return best;
}

// difflib's get_matching_blocks: disjoint matching runs, adjacent ones merged, ending with (la, lb, 0).
inline std::vector<Block> matching_blocks(const Words& a, const Words& b) {
  std::unordered_map<int32_t, std::vector<int64_t>> b2j;
  for (int64_t j = 0; j < static_cast<int64_t>(b.size()); ++j) b2j[b[j]].push_back(j);
  std::vector<Block> blocks;
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> queue{{0, a.size(), 0, b.size()}};
  while (!queue.empty()) {
    auto [alo, ahi, blo, bhi] = queue.back();
    queue.pop_back();
    Block m = longest_match(a, b2j, alo, ahi, blo, bhi);
    if (m.size) {
      blocks.push_back(m);
      if (alo < m.i && blo < m.j) queue.emplace_back(alo, m.i, blo, m.j);
      if (m.i + m.size < ahi && m.j + m.size < bhi) queue.emplace_back(m.i + m.size, ahi, m.j + m.size, bhi);
    }
  }
  std::sort(blocks.begin(), blocks.end());
  std::vector<Block> merged;
  Block run{0, 0, 0};
  for (const Block& m : blocks) {
    if (run.i + run.size == m.i && run.j + run.size == m.j) {
      run.size += m.size;
    } else {
      if (run.size) merged.push_back(run);
      run = m;
    }
  }
  if (run.size) merged.push_back(run);
  merged.push_back(Block{static_cast<int64_t>(a.size()), static_cast<int64_t>(b.size()), 0});
  return merged;
}

// difflib's get_opcodes: (tag, i1, i2, j1, j2) turning a into b, "equal" runs included.
using Opcode = std::tuple<const char*, int64_t, int64_t, int64_t, int64_t>;

inline std::vector<Opcode> opcodes(const Words& a, const Words& b) {
  std::vector<Opcode> out;
  int64_t i = 0, j = 0;
  for (const Block& m : matching_blocks(a, b)) {
    const char* tag = i < m.i && j < m.j ? "replace" : i < m.i ? "delete" : j < m.j ? "insert" : nullptr;
    if (tag) out.emplace_back(tag, i, m.i, j, m.j);
    i = m.i + m.size, j = m.j + m.size;
    if (m.size) out.emplace_back("equal", m.i, i, m.j, j);
  }
  return out;
}

// The elements of a and b that difflib matches: its ratio() is 2 * matched / (len(a) + len(b)).
inline int64_t matched(const Words& a, const Words& b) {
  int64_t total = 0;
  for (const Block& m : matching_blocks(a, b)) total += m.size;
  return total;
}

struct Edit {
  int64_t i1, i2;   // source words replaced
  Words words;      // by these
  int64_t count;    // candidates making it
};

inline Words edit_vote(const Words& source, const std::vector<Words>& candidates, int64_t need) {
  std::vector<Edit> edits;
  for (const Words& theirs : candidates) {
    int64_t i = 0, j = 0;
    for (const Block& m : matching_blocks(source, theirs)) {
      if (i < m.i || j < m.j) {  // difflib's replace, delete or insert opcode
        Words words(theirs.begin() + j, theirs.begin() + m.j);
        auto same = std::find_if(edits.begin(), edits.end(), [&](const Edit& e) {
          return e.i1 == i && e.i2 == m.i && e.words == words;
        });
        if (same != edits.end()) ++same->count;
        else edits.push_back(Edit{i, m.i, std::move(words), 1});
      }
      i = m.i + m.size, j = m.j + m.size;
    }
  }
  std::vector<const Edit*> chosen;
  for (const Edit& e : edits)
    if (e.count >= need) chosen.push_back(&e);
  // Left to right: at each word, of the edits that start there, the one more candidates make (on a
  // tie, an insertion before the word first): they are different candidates' answers to one place.
  std::sort(chosen.begin(), chosen.end(), [](const Edit* x, const Edit* y) {
    auto key = [](const Edit* e) { return std::make_tuple(e->i1, -e->count, e->i2 > e->i1, e->i2); };
    return key(x) < key(y) || (key(x) == key(y) && x->words < y->words);
  });
  Words out;
  int64_t at = 0, started = -1;
  for (const Edit* e : chosen) {
    if (e->i1 < at || e->i1 == started) continue;  // overlaps an edit applied, or another answer there
    out.insert(out.end(), source.begin() + at, source.begin() + e->i1);
    out.insert(out.end(), e->words.begin(), e->words.end());
    at = e->i2, started = e->i1;
  }
  out.insert(out.end(), source.begin() + at, source.end());
  return out;
}

}  // namespace lmcor
